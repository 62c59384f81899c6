"""`medunet pacs`: segment a series stored in a PACS and store the DICOM SEG back, over DICOMweb."""

from __future__ import annotations

from pathlib import Path

import click

from medunet.cli.app import cli, log


@cli.command()
@click.option("--url", required=True, metavar="URL",
              help="DICOMweb root of the PACS, e.g. http://127.0.0.1:8042/dicom-web (Orthanc).")
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="A run folder (uses best.pt) or a checkpoint file.")
@click.option("--study", "study_uid", required=True, metavar="UID", help="StudyInstanceUID of the study to segment.")
@click.option("--series", "series_uid", default=None, metavar="UID",
              help="SeriesInstanceUID to segment; needed when the study holds several image series.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the PACS to connect and to answer each request.")
@click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Extra tries after a connection failure or a busy server (HTTP 429/502/503/504).")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the SEG to this folder as <series uid>.seg.dcm.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override inference/post-processing settings, e.g. --set inference.overlap=0.25.")
@click.option("--tta", is_flag=True, help="Average over mirror flips (8x slower, slightly more accurate).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def pacs(url: str, model_path: Path, study_uid: str, series_uid: str | None, timeout: float, retries: int,
         keep: Path | None, overrides: tuple[str, ...], tta: bool, device: str) -> None:
    """Fetch a series from a PACS, segment it, and store the DICOM SEG in the same study.

    \b
    Examples:
      medunet pacs --url http://127.0.0.1:8042/dicom-web -m runs/liver --study 1.2.840.113619.2.55.3
      MEDUNET_DICOMWEB_USER=medunet MEDUNET_DICOMWEB_PASSWORD=... \\
        medunet pacs --url https://pacs.example.org/dicom-web -m runs/liver --study UID --series UID --keep segs/

    \b
    Steps: QIDO-RS finds the study's series, WADO-RS retrieves the chosen one into a temporary
    folder, the model segments it, and STOW-RS stores the SEG. A login is read from the
    environment variables MEDUNET_DICOMWEB_USER and MEDUNET_DICOMWEB_PASSWORD (never from the
    URL or the command line) and is never printed. Unreachable server, refused login, timeout or
    an unknown UID end with one error line and exit status 1; nothing is stored in the PACS
    unless the SEG was completely produced.
    """
    from medunet.inference.segmenter import Segmenter
    from medunet.net.dicomweb import DicomWebPacs, PacsConnection
    from medunet.workflows.pacs import segment_from_pacs

    server = DicomWebPacs(PacsConnection.from_environment(url, timeout=timeout, retries=retries))
    server.check()  # unreachable or refused before the model is loaded
    extra = list(overrides) + (["inference.tta_flips=true"] if tta else [])
    segmenter = Segmenter.from_checkpoint(model_path, device=device, overrides=extra)
    log.info("%r", segmenter)
    result = segment_from_pacs(segmenter, server, study_uid=study_uid, series_uid=series_uid, keep=keep)
    click.echo(
        f"stored SEG {result.seg_sop_instance_uid} for series {result.series_uid} "
        f"({result.instances_retrieved} slices) in study {result.study_uid} ({result.seconds:.1f} s)"
    )
