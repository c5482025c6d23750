"""The ``LitAPI`` of ``finegrained serve``: image in, top-k classes and probabilities out, with dynamic batching.

LitServe gathers up to ``max_batch_size`` requests that arrive within ``batch_timeout`` seconds and runs them as one
batch. A bad request in a batch must not fail the others: LitServe answers a whole batch with the error raised while
decoding any one of its requests, so :meth:`ClassifierAPI.decode_request` never raises. It returns the preprocessed
image or the :class:`~finegrained.serve.requests.BadRequest`; :meth:`ClassifierAPI.predict` runs the network on the
images only; :meth:`ClassifierAPI.encode_response` answers each request alone (a JSON error with its status, or
``{"predictions": [{"class", "index", "probability"}, ...]}``).
"""
from __future__ import annotations

import logging
from typing import Any, List, Union

import litserve as ls
import torch
from starlette.responses import JSONResponse

from datamodules.io import ImageLoadError
from finegrained.serve.model import ServedModel
from finegrained.serve.requests import BadRequest, check_image_size, image_bytes

log = logging.getLogger(__name__)


class ClassifierAPI(ls.LitAPI):
    """Args:
        source: a folder of ``finegrained export --format hf`` or an ``.onnx`` / ``.pt`` export.
        topk: classes returned per image.
        max_batch_size, batch_timeout: LitServe's dynamic batching (1: every request alone).
        max_image_bytes, max_pixels: the largest image file, and the most pixels its header may claim.
    """

    def __init__(self, source: str, topk: int = 5, max_batch_size: int = 16, batch_timeout: float = 0.01,
                 max_image_bytes: int = 20 << 20, max_pixels: int = 50_000_000):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.source, self.topk = source, topk
        self.max_image_bytes, self.max_pixels = max_image_bytes, max_pixels

    def setup(self, device: str) -> None:
        self.model = ServedModel(self.source, device)

    def decode_request(self, request) -> Union[torch.Tensor, BadRequest]:
        try:
            data = image_bytes(request, self.max_image_bytes)
            check_image_size(data, self.max_pixels, self.model.preprocessing["resize"])
            return self.model.preprocess(data, name="the image")
        except BadRequest as bad:
            return bad
        except ImageLoadError as err:
            return BadRequest(400, str(err))
        except MemoryError:
            return BadRequest(413, "the image is too large to decode in the memory this server has")
        except Exception as err:  # whatever else one image does, it fails alone (and is logged)
            log.exception("decoding a request failed")
            return BadRequest(500, f"could not process this image ({type(err).__name__}); see the server's log")

    def batch(self, inputs: List[Any]) -> List[Any]:
        return list(inputs)  # images and refusals side by side; predict stacks the images

    def predict(self, inputs: Any) -> Any:
        items = inputs if isinstance(inputs, list) else [inputs]
        images = [x for x in items if isinstance(x, torch.Tensor)]
        ranked = iter([])
        if images:
            probabilities = self.model.logits(torch.stack(images)).softmax(dim=1)
            ranked = iter(zip(*probabilities.topk(min(self.topk, probabilities.shape[1]), dim=1)))
        outputs = [next(ranked) if isinstance(x, torch.Tensor) else x for x in items]
        return outputs if isinstance(inputs, list) else outputs[0]

    def unbatch(self, output: List[Any]) -> List[Any]:
        return output

    def encode_response(self, output: Any):
        if isinstance(output, BadRequest):
            return JSONResponse({"error": output.message}, status_code=output.status)
        probabilities, indices = output
        return {"predictions": [{"class": self.model.class_names[i], "index": i, "probability": p}
                                for p, i in zip(probabilities.tolist(), indices.tolist())]}
