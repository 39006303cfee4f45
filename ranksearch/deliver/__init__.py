"""From a trial to a model to ship: the refine (``refine``), the verified export of a trial in .pt, ONNX or
TorchScript (``export``), a run's delivery of its best trials (``delivery``), and ``load_model`` (``load``, which
needs torch and none of the search)."""
