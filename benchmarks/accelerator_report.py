"""The record of benchmarks/accelerator.py: cases run under a time budget (result, error or
reason skipped), written as JSON and a markdown table after every case."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Report:
    def __init__(self, out: Path, budget_s: float, environment: dict[str, Any]) -> None:
        self.out, self.budget_s, self.t0 = out, budget_s, time.monotonic()
        self.data: dict[str, Any] = {"environment": environment, "budget_s": budget_s,
                                     "notes": [], "cases": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def case(self, section: str, name: str, fn: Callable[[], dict[str, Any]], *,
             needs: float = 0.0, skip: str | None = None) -> dict[str, Any]:
        """Runs fn() unless skipped or out of time; records its result or its error."""
        rec: dict[str, Any] = {"section": section, "case": name}
        if skip:
            rec.update(status="skipped", reason=skip)
        elif self.left() < needs:
            rec.update(status="skipped", reason=f"time budget: {max(self.left(), 0):.0f} s "
                                                f"left of {self.budget_s:.0f}")
        else:
            t0, c0 = time.monotonic(), time.process_time()
            try:
                rec.update(fn())
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one case's failure is its record
                rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:800]}",
                           where=traceback.format_exc(limit=-3)[-1500:])
            rec["wall_s"] = round(time.monotonic() - t0, 2)
            rec["cpu_s"] = round(time.process_time() - c0, 2)
        print(f"[{time.monotonic() - self.t0:6.1f} s] {section}: {name}: {rec['status']}"
              + (f" ({rec.get('error') or rec.get('reason')})" if rec["status"] != "ok" else ""),
              flush=True)
        self.data["cases"].append(rec)
        self.write()
        return rec

    def find(self, section: str, name: str) -> dict[str, Any] | None:
        return next((c for c in self.data["cases"] if c["section"] == section
                     and c["case"] == name), None)

    def same_as(self, section: str, name: str, other: dict[str, Any], why: str) -> None:
        """Records a case that is the same program as `other` (not run again)."""
        rec = {**other, "case": name, "same_as": other["case"], "reason": why}
        self.data["cases"].append(rec)
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "accelerator.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "accelerator.md").write_text(self.markdown())

    def markdown(self) -> str:
        env = self.data["environment"]
        lines = [f"{env['date']}, {env['device']} × {env['devices']}, jax {env['jax']}"
                 f"{' (smoke: tiny sizes)' if env['smoke'] else ''}; peak "
                 f"{env['peak_tflops']:.3g} TFLOP/s ({env['peak_source']}), measured bfloat16 "
                 f"matmul {env['matmul_tflops']:.1f} TFLOP/s; "
                 f"{self.data.get('elapsed_s', 0):.0f} s of a {self.budget_s:.0f} s budget", ""]
        lines += _bench_table(self._section("bench"))
        lines += _other_tables(self)
        lines += [f"- {n}" for n in self.data["notes"]]
        return "\n".join(lines) + "\n"

    def _section(self, section: str) -> list[dict[str, Any]]:
        return [c for c in self.data["cases"] if c["section"] == section]


def _status(c: dict[str, Any]) -> str:
    if c.get("same_as"):
        return f"= {c['same_as'].split(' ', 1)[1]} ({c['reason']})"
    if c["status"] == "ok":
        return (f"batch {c['batch_halved_from'] // 2} (out of memory at "
                f"{c['batch_halved_from']})" if c.get("batch_halved_from") else "")
    return f"{c['status']}: {c.get('error') or c.get('reason')}"[:160]


def _bench_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| model / attention / remat | tokens/s | step ms | MFU formula | MFU XLA | "
           "compile s | peak GiB | note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in rows:
        if c["status"] != "ok":
            out.append(f"| {c['case']} | | | | | | | {_status(c)} |")
            continue
        xla = f"{100 * c['mfu_xla']:.1f}%" if c.get("mfu_xla") is not None else "n/a"
        out.append(f"| {c['case']} | {c['tokens_per_sec']:,.0f} | {c['step_ms']:.1f} | "
                   f"{100 * c['mfu_formula']:.1f}% | {xla} | {c['compile_s']:.1f} | "
                   f"{c['peak_memory_gib']:.2f} | {_status(c)} |")
    return [*out, ""]


def _other_tables(report: Report) -> list[str]:
    out = ["| generation (KV cache, greedy) | new tokens/s | note |", "|---|---:|---|"]
    for c in report._section("generation"):
        tps = f"{c['tokens_per_sec']:,.0f}" if c["status"] == "ok" else ""
        out.append(f"| {c['case']}, prompt {c.get('prompt_len', '')}, "
                   f"{c.get('new_tokens', '')} new | {tps} | {_status(c)} |")
    out += ["", "| checkpoint | state GB | save (blocking) s | save (total) s | restore s | "
            "note |", "|---|---:|---:|---:|---:|---|"]
    for c in report._section("checkpoint"):
        if c["status"] == "ok":
            out.append(f"| {c['case']} ({c['params'] / 1e6:.0f}M params) | "
                       f"{c['bytes'] / 1e9:.2f} | {c['save_blocking_s']:.2f} | "
                       f"{c['save_total_s']:.2f} | {c['restore_s']:.2f} | |")
        else:
            out.append(f"| {c['case']} | | | | | {_status(c)} |")
    out += ["", "| cuDNN attention vs reference | max error forward | max error dq, dk, dv | "
            "tolerance | passed | note |", "|---|---:|---:|---:|---|---|"]
    for c in report._section("cudnn_check"):
        if c["status"] == "ok":
            for name, r in c["results"].items():
                out.append(f"| {name} {c['shape']} | {r['forward']:.2e} | "
                           + ", ".join(f"{r[g]:.2e}" for g in ("dq", "dk", "dv"))
                           + f" | {c['tolerance']} | {r['passed']} | |")
        else:
            out.append(f"| {c['case']} | | | | | {_status(c)} |")
    out += [""] + [f"- xla_flops {c['case']}: {_status(c)}" for c in
                   report._section("xla_flops") if c["status"] != "ok"]
    return out
