"""TensorBoard as a person opens it: the curves first, the run's results in the HParams tab.

TensorBoard sorts tag groups by name (``/`` and ``_`` before letters, digits by value) and
opens the first two. Lightning's ``TensorBoardLogger`` adds an ``epoch`` scalar to every
logging call, and ``log_hyperparams(params, metrics)`` writes each metric as a scalar of one
point; both, like the test stage's ``test/*``, sort before ``train`` and ``val``. Here:

- :class:`TensorBoardLogger` leaves out the ``epoch`` scalar (the step axis and the
  ``train/*_epoch`` curves carry the epochs) and the test stage's ``test/*`` scalars, which
  :func:`write_results` writes with the run's other results;
- :func:`write_results` writes the final metrics as one-point scalars under
  ``z_hparams/<metric>`` (after every curve, so collapsed at the bottom of the Scalars tab) and
  the HParams plugin's experiment, session start and end: its metric columns read those
  scalars under their own names (``test/nll``), its hyperparameter columns put the trial's
  varied overrides first, and the trial is named by them
  (:class:`~bbb_lightning.training.hparams.Trial`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

__all__ = ["RESULTS", "TensorBoardLogger", "metric_order", "write_results"]

# The tag group of the run's final metrics, the HParams tab's metric columns.
RESULTS = "z_hparams"
_DROPPED = ("epoch",)
_TEST_STAGE = "test/"


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger without the ``epoch`` scalar and the ``test/*`` scalars
    (those go to the ``z_hparams`` results, :func:`write_results`)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        kept = {
            name: value
            for name, value in metrics.items()
            if name not in _DROPPED and not name.startswith(_TEST_STAGE)
        }
        if kept:
            super().log_metrics(kept, step)


def metric_order(names: Collection[str]) -> list[str]:
    """``best/*`` first, then ``test/*``, ``val/*`` and the rest, each sorted by name: the
    HParams tab shows the first five metric columns."""
    rank = {"best/": 0, "test/": 1, "val/": 2}
    return sorted(names, key=lambda name: (rank.get(name[: name.find("/") + 1], 3), name))


def _summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    data.version = metadata.PLUGIN_DATA_VERSION
    plugin = SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def _hparam_info(name: str, value: Any, differs: bool) -> api_pb2.HParamInfo:
    if isinstance(value, bool):
        kind = api_pb2.DATA_TYPE_BOOL
    elif isinstance(value, int | float):
        kind = api_pb2.DATA_TYPE_FLOAT64
    else:
        kind = api_pb2.DATA_TYPE_STRING
    return api_pb2.HParamInfo(name=name, type=kind, differs=differs)


def _session_start(hparams: Mapping[str, Any], group_name: str) -> Summary:
    start = plugin_data_pb2.SessionStartInfo(group_name=group_name, start_time_secs=time.time())
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = str(value)
    return _summary(
        metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)
    )


def write_results(
    writer: Any,
    hparams: Mapping[str, Any],
    metrics: Mapping[str, float],
    trial_name: str,
    varied: Collection[str],
    step: int,
) -> None:
    """The run's results in TensorBoard (see the module's docstring).

    Args:
        writer: the run's ``SummaryWriter``.
        hparams: flat hyperparameters (:func:`~bbb_lightning.training.hparams.flat_hparams`).
        metrics: the final metrics (``metrics.json``); each is written as the scalar
            ``z_hparams/<name>`` at ``step`` and is a metric column named ``<name>``.
        trial_name: the HParams row's name ("" for TensorBoard's own: the run's folder).
        varied: the hyperparameters the trial varies: marked as differing, so listed first.
    """
    names = metric_order(metrics)
    for name in names:
        writer.add_scalar(f"{RESULTS}/{name}", float(metrics[name]), step)
    hparam_infos = [_hparam_info(k, v, k in varied) for k, v in hparams.items()]
    metric_infos = [
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=f"{RESULTS}/{name}"), display_name=name)
        for name in names
    ]
    experiment = api_pb2.Experiment(
        hparam_infos=hparam_infos, metric_infos=metric_infos, time_created_secs=time.time()
    )
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    data = plugin_data_pb2.HParamsPluginData
    file_writer = writer._get_file_writer()
    file_writer.add_summary(_summary(metadata.EXPERIMENT_TAG, data(experiment=experiment)), step)
    file_writer.add_summary(_session_start(hparams, trial_name), step)
    file_writer.add_summary(
        _summary(metadata.SESSION_END_INFO_TAG, data(session_end_info=end)), step
    )
    writer.flush()
