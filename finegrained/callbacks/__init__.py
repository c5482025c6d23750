"""The training and test protocols of the papers as Lightning callbacks (as Lightning's own fine-tuning example).

* :class:`TwoStageFinetuning` -- B-CNN, CBP, G²DeNet, HIHCA: the classifier first, on the frozen backbone
  (``frozen`` route) or on cached features (``cached`` route), then every layer.
* :class:`DataDependentInit` -- NetVLAD's k-means centres, LRBP's PCA, from backbone features before the first step.
* :class:`ActivationGradientClipping` -- G²DeNet's clamp of back-propagated layer derivatives.
* :class:`SVMTest` -- B-CNN's and HIHCA's one-vs-all linear SVMs on head features at test time.

The command line configures each from the recipe (``stage1:``, ``data_init:``, ``clip_activation_grad:``,
``svm:``); in Python, pass them to ``Trainer(callbacks=[...])``. A :class:`~finegrained.model.FineGrainedClassifier`
whose head needs a data-dependent initialisation adds a default :class:`DataDependentInit` itself.
"""
from finegrained.callbacks.activation_clipping import ActivationGradientClipping
from finegrained.callbacks.data_init import DataDependentInit, init_head_from_data
from finegrained.callbacks.svm_test import SVMTest
from finegrained.callbacks.two_stage import TwoStageFinetuning

__all__ = ["ActivationGradientClipping", "DataDependentInit", "SVMTest", "TwoStageFinetuning", "init_head_from_data"]
