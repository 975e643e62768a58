"""MQAR, the BASED paper's recall-vs-state-size study: data generator, models, sweep, report.

```python
from linmix.mqar import run_preset, write_report

rows = run_preset("quick", "runs/mqar-quick")      # resumable; one row per model
paths = write_report("runs/mqar-quick")           # results.md, pareto.png and curves.png
```
"""

from linmix.mqar.data import (
    IGNORE_INDEX, MQARSegment, generate_epoch_segments, generate_mqar, generate_segments, per_example_accuracy, query_slot_probabilities,
)
from linmix.mqar.models import MIXERS, LongConv, MQARModel, MQARModelConfig, masked_recall_loss, state_size_bytes
from linmix.mqar.presets import PRESETS, MQARPreset, get_preset
from linmix.mqar.report import load_curves, load_results, pareto_frontier, results_table, write_report
from linmix.mqar.sweep import curve_gain, epoch_batches, evaluate, run_preset, run_sweep, train_and_evaluate

__all__ = [
    "IGNORE_INDEX", "MIXERS", "PRESETS", "LongConv", "MQARModel", "MQARModelConfig", "MQARPreset", "MQARSegment",
    "curve_gain", "epoch_batches", "evaluate", "generate_epoch_segments", "generate_mqar", "generate_segments", "get_preset",
    "load_curves", "load_results",
    "masked_recall_loss", "pareto_frontier", "per_example_accuracy", "query_slot_probabilities", "results_table",
    "run_preset", "run_sweep", "state_size_bytes", "train_and_evaluate", "write_report",
]
