"""``dinolab serve``: a web demo and a JSON/HTTP API over DINOv2 backbones.

Modules: ``app`` (FastAPI app factory ``create_app``), ``routes`` (task endpoints), ``tasks`` (the
computations, no HTTP), ``registry`` (served models, official weights or the fallback), ``fallback``
(the self-pretrained model used offline), ``heads`` (segmentation / depth heads), ``inputs`` (upload
checks), ``guards`` (model queue, body limit and deadline, request cap, Origin check),
``connections`` (uvicorn protocol with a header deadline and a connection cap), ``public`` (no server
paths in replies), ``settings`` (YAML + flags), ``gallery`` (sample photos by id), ``static/`` (the
page). FastAPI and uvicorn come with ``pip install 'dinolab[serve]'``; importing this package alone
needs neither.
"""
