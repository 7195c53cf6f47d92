"""DiDAE's reports: results.json, a markdown table, and the counterfactual sets as .npz."""

from __future__ import annotations

import numpy as np

from jaxcf.data.common import to_uint8
from jaxcf.didae import controls
from jaxcf.utils import io
from jaxcf.utils.images import save_image_set


def save_counterfactuals(path: str, x, x_cf, labels, factors, flipped) -> None:
    """One counterfactual set as .npz: inputs [B, ...] and counterfactuals [K, B, ...] as uint8,
    source labels, the inputs' factors (Square) and which counterfactuals flipped the student."""
    arrays = dict(inputs=to_uint8(x), counterfactuals=to_uint8(x_cf), labels=np.asarray(labels),
                  flipped=np.asarray(flipped))
    if factors is not None:
        arrays["factors"] = np.asarray(factors)
    save_image_set(path, **arrays)


def write_report(results: dict, workdir: str) -> None:
    """results.json and a markdown table a person can read."""
    io.write_json(io.join(workdir, "results.json"), results)
    b = results["before"]
    lines = [f"# DiDAE + CFKD ({results['variant']}, student: {results['student']})", "",
             "| method | AGA | worst group | Gain | CFs used (true/false) |", "|---|---|---|---|---|",
             f"| poisoned student | {b['aga']:.3f} | {b['worst_group']:.3f} | - | - |"]
    for r in results["cfkd"]:
        if "aga" in r:
            lines.append(f"| CFKD {r['dictionary']} + {r['teacher']} teacher | {r['aga']:.3f} | "
                         f"{r['worst_group']:.3f} | {r['gain']:.3f} | {r['counterfactuals']} "
                         f"({r['true']}/{r['false']}) |")
        else:
            lines.append(f"| CFKD {r['dictionary']} + {r['teacher']} teacher | - | - | - | 0 (nothing flipped) |")
    for name, m in results["baselines"].items():
        lines.append(f"| {name.replace('_', ' (')}) probe on Phi | {m['aga']:.3f} | {m['worst_group']:.3f} | - | - |")
    lines += ["", f"oracle (balanced) AGA {results['oracle_aga']:.3f}; adversarial surrogate AGA "
                  f"{results['surrogate_aga']:.3f}", "",
              "| dictionary | flip rate | NAFR | CF/s | probe agreement | atoms labelled true |", "|---|---|---|---|---|---|"]
    for kind, d in results["dictionaries"].items():
        lines.append(f"| {kind} | {d['flip_rate']:.3f} | {d['nafr']:.3f} | {d['cf_per_second']:.1f} | "
                     f"{d['probe_agreement']:.3f} | {d['atom_is_true']} |")
    names = controls.FACTOR_NAMES  # the reader's columns (Square)
    for kind, d in results["dictionaries"].items():
        if "disentanglement_matrix_reader" in d:
            lines += ["", f"{kind} atoms (reflections), mean |factor change| read from pixels / factor range:", "",
                      "| atom | " + " | ".join(names) + " | edit length (Alg. 2, x code spread) |", "|---" * 6 + "|"]
            for k, row in enumerate(d["disentanglement_matrix_reader"]):
                length = d["edit_length"][k] if k < len(d.get("edit_length", [])) else float("nan")
                lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {length:.2f} |")
    c = results.get("controls")
    if c:
        lines += ["", "Autoencoder controls, read by the pixel reader (colours 0..255, positions in 64-px units):", "",
                  "| control | " + " | ".join(names) + " |", "|---" * 5 + "|"]
        for key, label in (("identity", "reconstruction, mean abs error"), ("fresh_noise", "fresh-noise sample, mean abs error")):
            lines.append(f"| {label} | " + " | ".join(f"{c[key][n]:.1f}" for n in names) + " |")
        for n in names:
            sw = c["swap"][n]
            cells = [f"moved {sw['moved_fraction_median']:.2f}" if m == n else f"{sw['others'][m]:.1f}" for m in names]
            lines.append(f"| ground-truth swap of {n} | " + " | ".join(cells) + " |")
    lines += ["", f"total {results['seconds']} s (compile of the counterfactual program {results['compile_seconds']} s)"]
    text = "\n".join(lines) + "\n"
    io.write_text(io.join(workdir, "results.md"), text)
    print(text, flush=True)
