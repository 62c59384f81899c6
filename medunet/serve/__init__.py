"""``medunet serve``: a DICOM node and REST service that receives series, segments them and sends the results back.

``config`` (the service's YAML), ``records`` (the typed rows every part exchanges), ``routing`` (which models
run on a series), ``store`` (the durable job queue on SQLite or PostgreSQL), ``audit`` (the JSON-lines audit
log), ``api`` (health, jobs, models and Prometheus metrics over HTTP). Needs the ``medunet[serve]`` extra.
"""
