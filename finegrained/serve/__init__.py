"""``finegrained serve``: a trained classifier behind an HTTP endpoint, with LitServe (Lightning's serving library).

* :mod:`~finegrained.serve.model` -- what is served: a Hugging Face folder (``finegrained export --format hf``) or an
  ONNX / TorchScript export with its manifest; images preprocessed exactly as ``finegrained test`` did
  (:func:`finegrained.predict.preprocess_image`, the function ``predict-images`` uses).
* :mod:`~finegrained.serve.requests` -- reading one request: the image bytes from a multipart form or a base64 JSON
  body, and the one-line reason a bad request is refused with.
* :mod:`~finegrained.serve.api` -- the ``LitAPI``: dynamic batching, top-k classes and probabilities as JSON.
* :mod:`~finegrained.serve.server` -- the ``LitServer``, its checks before anything reaches a worker, and start-up.
* :mod:`~finegrained.serve.load` -- a bounded load test against a running server (``finegrained bench serve``).
"""
