"""`mllm eval --tasks`: lm-evaluation-harness benchmarks (HellaSwag, ARC, ...) on a checkpoint.

The checkpoint is scored in-process, on the run's device and in `--dtype`, through lm-eval's
Python API: `MllmLM` is an lm-eval language model over mllm's own GPT and tokenizer. It asks
exactly what lm-eval's Hugging Face model (`lm_eval --model hf`) asks of an exported folder
(`mllm export`): the same context / continuation split (lm-eval's `TemplateLM`), the same
left-truncation to the context, log-softmax in fp32 over the continuation's positions. So in
fp32 the two give the same numbers.

Tasks are lm-eval's names (hub tasks need the hub to download their data) or paths of task YAML
files, so a local task over local files runs offline.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mllm.config import EvalConfig
from mllm.errors import MllmError, UsageError, first_line, parse_error_line
from mllm.model import GPT


def task_specs(tasks: Iterable[str]) -> list[str]:
    """--tasks values, comma-separated or repeated, as one list (empty names dropped)."""
    return [name.strip() for value in tasks for name in value.split(",") if name.strip()]


def resolve_tasks(specs: list[str]) -> tuple[list[Any], Any]:
    """lm-eval task names or YAML configs for `specs`, and the TaskManager that knows them;
    one UsageError naming what is not a task."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    # Indexing lm-eval's thousands of built-in tasks takes seconds: only when a name is asked.
    names_asked = any(not spec.endswith((".yaml", ".yml")) for spec in specs)
    manager = TaskManager(include_defaults=names_asked)
    resolved: list[Any] = []
    missing: list[str] = []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            path = Path(spec)
            if not path.is_file():
                raise UsageError(f"--tasks: task file not found: {path}")
            try:
                resolved.append(load_yaml(str(path.absolute()), resolve_func=True))
            except Exception as e:  # YAML syntax, a bad !function, ...: the parsers' own types
                raise UsageError(
                    f"--tasks: {path} is not a task file lm-eval reads: {parse_error_line(e)}"
                ) from None
            continue
        matches = manager.match_tasks([spec])
        if not matches:
            missing.append(spec)
        resolved.extend(matches)
    if missing:
        raise UsageError(
            f"--tasks: not an lm-eval task: {', '.join(missing)} (`lm_eval ls tasks` lists "
            "them; or give the path of a task YAML file)"
        )
    return resolved, manager


def _lm_base() -> type:
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise MllmError("--tasks needs lm-evaluation-harness: pip install 'mllm[eval]'") from None
    return TemplateLM


def make_lm(model: GPT, tokenizer: Any, eot_id: int, dtype: torch.dtype, batch_size: int) -> Any:
    """An lm-eval language model over `model` (see the module doc)."""
    from mllm.decode import Decoder
    from mllm.device import autocast
    from mllm.generate import fit_prompt, generate_ids
    from mllm.sampling import SamplingParams
    from mllm.textstream import TextStream, token_byte_table

    class MllmLM(_lm_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.tokenizer_ = tokenizer
            self._device = model.head_weight.device
            self.max_length = model.config.context
            self.batch_size = batch_size
            self._eot = eot_id

        @property
        def eot_token_id(self) -> int:
            return self._eot

        def tok_encode(
            self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
        ) -> list[int]:
            return self.tokenizer_.encode(string).ids

        def tok_decode(self, tokens: list[int]) -> str:
            return self.tokenizer_.decode(tokens)

        @torch.inference_mode()
        def _loglikelihood_tokens(
            self, requests: list[tuple[Any, list[int], list[int]]], **kwargs: Any
        ) -> list[tuple[float, bool]]:
            """(sum of the continuation's log-probabilities, whether it is the greedy one) per
            request; windows left-truncated to the context, as lm-eval's HF model does."""
            results: list[tuple[float, bool]] = []
            for first in range(0, len(requests), self.batch_size):
                chunk = requests[first : first + self.batch_size]
                inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
                width = max(len(ids) for ids in inputs)
                # Right-padding is harmless to a causal model: no real position sees the pad.
                batch = torch.tensor(
                    [ids + [0] * (width - len(ids)) for ids in inputs], device=self._device
                )
                with autocast(self._device, dtype):
                    hidden = self.model.hidden_states(batch)
                for row, ((_, _, cont), ids) in enumerate(zip(chunk, inputs, strict=True)):
                    positions = hidden[row, len(ids) - len(cont) : len(ids)]
                    with autocast(self._device, dtype):
                        logits = self.model.logits(positions)
                    logprobs = F.log_softmax(logits.float(), dim=-1)
                    target = torch.tensor(cont, device=self._device)
                    picked = logprobs.gather(1, target[:, None])[:, 0]
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    results.append((float(picked.double().sum()), greedy))
            return results

        def loglikelihood_rolling(self, requests: list[Any], **kwargs: Any) -> list[float]:
            """Whole-text log-likelihoods over disjoint windows (perplexity tasks)."""
            from lm_eval import utils

            totals = []
            for (text,) in (request.args for request in requests):
                windows = [
                    (None, *utils.make_disjoint_window(window))
                    for window in utils.get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    )
                ]
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
            return totals

        def generate_until(self, requests: list[Any], **kwargs: Any) -> list[str]:
            """Continuations up to the first stop string (greedy unless the task samples)."""
            decoder = Decoder(self.model)
            table = token_byte_table(self.tokenizer_)
            outputs = []
            for context, gen_kwargs in (request.args for request in requests):
                gen_kwargs = dict(gen_kwargs)
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new_tokens = int(gen_kwargs.get("max_gen_toks", 256))
                temperature = float(gen_kwargs.get("temperature", 0.0))
                if not gen_kwargs.get("do_sample", False):
                    temperature = 0.0
                room = max(1, self.max_length - new_tokens)
                prompt = fit_prompt(self.tok_encode(context), room)
                stream = TextStream(table, until)
                text = ""
                for token in generate_ids(
                    decoder, prompt, SamplingParams(temperature), new_tokens, eot_id=self._eot
                ):
                    text += stream.push(token)
                    if stream.stopped:
                        break
                outputs.append(text + stream.finish())
            return outputs

    return MllmLM()


def run_tasks(config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Run the --tasks on the checkpoint; task name -> its metrics under lm-eval's own keys."""
    from mllm import console
    from mllm.device import DTYPE_NAMES, pick_device, resolve_eval_dtype
    from mllm.generate import EOT_TEXT
    from mllm.train.checkpoint import find_checkpoint, load_checkpoint, load_run_tokenizer

    _lm_base()  # a clear error before any loading when lm-eval is missing
    import datasets
    from lm_eval import simple_evaluate

    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its info lines; warnings stay

    specs = task_specs(config.tasks)
    if not specs:
        raise UsageError("--tasks: name at least one task")
    checkpoint = find_checkpoint(config.run_dir, config.checkpoint)
    device = pick_device(config.device)
    dtype = resolve_eval_dtype(config.dtype, device)
    loaded = load_checkpoint(checkpoint, device)  # fp32 weights; autocast picks the precision
    tokenizer = load_run_tokenizer(loaded)
    eot_id = loaded.data.eot_id
    if eot_id is None:
        eot_id = tokenizer.token_to_id(EOT_TEXT)
    tasks, manager = resolve_tasks(specs)
    console.info(
        f"lm-eval tasks {', '.join(specs)} on {checkpoint} ({device.type}, {DTYPE_NAMES[dtype]})"
    )
    lm = make_lm(loaded.model, tokenizer, eot_id, dtype, config.batch_size)
    try:
        output = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=config.limit, log_samples=False
        )
    except MllmError:
        raise
    except Exception as e:  # a task's data, template or config: lm-eval's and datasets' types
        hub = " (hub tasks need the Hugging Face Hub; offline, give a task YAML over local files)"
        offline = "offline" in str(e).lower() or "couldn't reach" in str(e).lower()
        raise MllmError(
            f"--tasks {','.join(specs)}: lm-eval could not run it: {type(e).__name__}: "
            f"{first_line(e)}{hub if offline else ''}"
        ) from None
    if output is None:
        raise MllmError("lm-eval returned no results")
    # lm-eval's metric keys are "metric,filter" ("acc,none"); "alias", "name", "sample_len" are
    # bookkeeping
    return {
        task: {key: value for key, value in metrics.items() if "," in key}
        for task, metrics in output["results"].items()
    }


def print_results(results: dict[str, dict[str, Any]], as_json: bool) -> None:
    """One JSON line (--json), or a table of each task's metrics, on stdout."""
    if as_json:
        sys.stdout.write(json.dumps(results, default=str) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mllm eval · lm-eval tasks", title_justify="left")
    for column in ("task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for task, metrics in results.items():
        for key, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(task, key, shown)
    Console(highlight=False).print(table)
