"""Recurrence for pretrained decoders (METHODS.md section 3): a small memory carried window to window.

- `module`: `RecurrenceConfig`, `init_memory_module`, `initial_memory`, `update_memory`, `memory_kv`;
- `model`: `window_step`, `run_windows` (`lax.scan` over windows, memory as the carry, optional
  `jax.checkpoint` per window), `recurrence_loss` for the shared training loop;
- `train`: `train_recurrence`, `save_module` / `load_module` (Orbax, the module alone);
- `evaluate`: `evaluate_windows` (recurrence or disjoint windows, documents of any length),
  `evaluate_sliding`, `window_costs` (compiled FLOPs and peak bytes).

Example:
    >>> import makemost_jax as mm                                                       # doctest: +SKIP
    >>> from makemost_jax.recurrence import evaluate_windows, load_module
    >>> lm, tok = mm.load(), mm.load_tokenizer()                                         # doctest: +SKIP
    >>> module, lm = load_module("runs/memory", lm)                                      # doctest: +SKIP
    >>> evaluate_windows(lm, [tok.encode_for_model(open("book.txt").read())], 128, module).ppl  # doctest: +SKIP
"""

from makemost_jax.recurrence.evaluate import (
                                              WindowedResult,
                                              compiled_stats,
                                              evaluate_sliding,
                                              evaluate_windows,
                                              window_costs,
)
from makemost_jax.recurrence.model import check_window, recurrence_loss, run_windows, split_sequence, window_step
from makemost_jax.recurrence.module import (
                                              MemoryParams,
                                              RecurrenceConfig,
                                              init_memory_module,
                                              initial_memory,
                                              memory_kv,
                                              update_memory,
)
from makemost_jax.recurrence.train import RecurrenceRun, load_module, save_module, train_recurrence

__all__ = ["MemoryParams", "RecurrenceConfig", "RecurrenceRun", "WindowedResult", "check_window", "compiled_stats",
           "evaluate_sliding", "evaluate_windows", "init_memory_module", "initial_memory", "load_module",
           "memory_kv", "recurrence_loss", "run_windows", "save_module", "split_sequence", "train_recurrence",
           "update_memory", "window_costs", "window_step"]
