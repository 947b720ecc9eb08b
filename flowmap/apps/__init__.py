"""Applications: the ``flowmap`` command (``fit``/``sample``/``report``) and recipe pipelines."""
