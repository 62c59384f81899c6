"""`medunet serve`: run the DICOM node, the job queue, the models and the REST API until stopped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from medunet.cli.app import cli


@cli.command("serve")
@click.option("-c", "--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The service's YAML file (see configs/serve.example.yaml and docs/serving.md).")
@click.option("--worker", is_flag=True,
              help="Run only workers, heartbeat and sender against the config's database (no DICOM node, no scheduler; "
                   "no API unless --api-port): start several, on several machines sharing the storage folder, for one queue.")
@click.option("--receiver-only", is_flag=True,
              help="Run only the DICOM node, the scheduler and the API (no model loaded, nothing segmented or sent): "
                   "the --worker processes do that.")
@click.option("--api-port", type=click.IntRange(1, 65535), default=None,
              help="The REST API's port instead of api.port (a --worker process runs the API only when given this).")
def serve(config_path: Path, worker: bool, receiver_only: bool, api_port: int | None) -> None:
    """Run a DICOM node that segments the series a PACS sends and sends the masks back, until SIGTERM / Ctrl-C.

    The PACS (or scanner) sends series to the node with C-STORE; a series is complete after
    node.stable_seconds of silence; routing rules choose the model(s); each job runs from a durable
    queue (SQLite in the storage folder, or PostgreSQL) and its DICOM SEG / RTSTRUCT go to the
    destinations (C-STORE, STOW-RS or a folder), retried with back-off. A kill at any moment loses
    nothing: on restart unfinished jobs resume and nothing is sent twice. REST API on api.host:port:
    GET /health, /jobs, /jobs/{id}, POST /jobs/{id}/retry, GET /models, /metrics.

    \b
    A minimal serve.yaml:
      node: {ae_title: MEDUNET, port: 11112, storage: /var/lib/medunet}
      models: {liver: {path: runs/liver}}
      routes:
        - {name: ct, match: {modality: [CT]}, models: [liver]}
      destinations:
        pacs: {kind: dicom, ae_title: PACS, host: pacs.local, port: 104, formats: [dicom-seg, rtstruct]}
      delivery: {send_to: [pacs]}

    \b
    Then, on the PACS, add the node (AE MEDUNET, this host, port 11112) and send it a CT series:
      medunet serve -c serve.yaml
      storescu -aec MEDUNET localhost 11112 series/*.dcm      # or from the PACS
      curl localhost:8080/jobs                                  # the job, then the SEG in the PACS

    \b
    More machines: put the queue in PostgreSQL (database.url) and the storage folder on shared
    storage at the same path everywhere, then run one receiver and any number of workers:
      medunet serve -c serve.yaml --receiver-only              # node, scheduler, API
      medunet serve -c serve.yaml --worker                      # on each GPU machine
      medunet serve -c serve.yaml --worker --api-port 8081      # a worker with its own /health

    Needs the serve extra: pip install 'medunet[serve]'. See docs/serving.md.
    """
    from medunet.serve.config import load_serve_config
    from medunet.serve.records import import_serve_extra

    if worker and receiver_only:
        raise click.UsageError("--worker and --receiver-only exclude each other (without either, one process runs everything)")
    config = load_serve_config(config_path)
    if api_port is not None:
        config = dataclasses.replace(config, api=dataclasses.replace(config.api, port=api_port))
    for module, what in (("pynetdicom", "the DICOM node"), ("fastapi", "the REST API"), ("uvicorn", "the REST API")):
        import_serve_extra(module, needed_for=f"medunet serve ({what})")
    from medunet.serve.service import MODES, Service

    roles = MODES["worker"] | ({"api"} if api_port is not None else set()) if worker else MODES["receiver" if receiver_only else "all"]
    Service(config, roles=roles).run_forever()
