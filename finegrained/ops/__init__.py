"""Matrix functions of second-order pooling, one module per family (they import nothing but torch).

==========================  ===================================================================
module                      what it holds
==========================  ===================================================================
``ops.precision``           the float32 rule under autocast (``full_precision``, ``float32_matrices``)
``ops.covariance``          ``covariance``, ``gram``, ``triu_vec``, ``signed_sqrt``, ``sym``
``ops.newton_schulz``       ``newton_schulz`` (the one iteration), ``sqrtm_newton_schulz`` (iSQRT-COV),
                            ``inv_newton_schulz`` (iSICE)
``ops.isqrt``               the fused ``isqrt_cov`` (iSQRT-COV) with its lean backward
``ops.lyapunov``            ``lyapunov_newton_schulz``, ``sqrtm_newton_schulz_lyapunov`` (improved B-CNN) and the
                            Lyapunov backward of MPA-Lya
``ops.pade``                ``sqrtm_pade``: MPA-Lya / MTP-Lya (Padé or Taylor forward, Lyapunov backward)
``ops.sice``                ``sparse_inverse_covariance`` (iSICE's projected gradient)
``ops.svpn``                ``sv_power_normalise`` (SoT's singular-value power normalisation)
``ops.eig``                 ``eig_power``, ``eig_log``: eigendecomposition with the K-matrix backward
``ops.substitutes``         ``powm_newton_schulz``, ``logm_newton_schulz``: eigendecomposition-free
                            substitutes for ONNX
``ops.sketch``              count sketches, Tensor Sketch, Random Maclaurin, ``CountSketches``
``ops.backward``            ``first_order_only``: hand-written backwards refuse double backward
==========================  ===================================================================

Everything public is importable from :mod:`finegrained.ops` directly. Shapes use B for the batch,
C (or d) for channels and M = H*W for positions.
"""
from finegrained.ops.covariance import covariance, gram, signed_sqrt, sym, triu_indices_flat, triu_vec
from finegrained.ops.eig import eig_log, eig_power
from finegrained.ops.isqrt import isqrt_cov
from finegrained.ops.lyapunov import lyapunov_newton_schulz, sqrtm_newton_schulz_lyapunov
from finegrained.ops.newton_schulz import inv_newton_schulz, newton_schulz, sqrtm_newton_schulz
from finegrained.ops.pade import sqrtm_pade
from finegrained.ops.sice import sparse_inverse_covariance
from finegrained.ops.svpn import sv_power_normalise
from finegrained.ops.precision import at_least_float32, float32_matrices, full_precision
from finegrained.ops.sketch import (CountSketches, count_sketch, count_sketch_matrix, random_maclaurin, tensor_sketch,
                                    tensor_sketch_gram, tensor_sketch_hashed)
from finegrained.ops.substitutes import logm_newton_schulz, powm_newton_schulz

__all__ = ["covariance", "gram", "signed_sqrt", "sym", "triu_indices_flat", "triu_vec", "eig_log", "eig_power",
           "inv_newton_schulz", "sqrtm_pade", "sparse_inverse_covariance", "sv_power_normalise",
           "isqrt_cov", "lyapunov_newton_schulz", "newton_schulz", "sqrtm_newton_schulz", "sqrtm_newton_schulz_lyapunov",
           "at_least_float32", "float32_matrices", "full_precision", "CountSketches", "count_sketch",
           "count_sketch_matrix", "random_maclaurin", "tensor_sketch", "tensor_sketch_gram", "tensor_sketch_hashed",
           "logm_newton_schulz", "powm_newton_schulz"]
