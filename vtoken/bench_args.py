"""Checks of ``vtoken bench``'s (and ``vtoken train-projector``'s) arguments, run before any model loads:
each bad value is a ``ValueError`` whose one line names the problem and the fix (the CLI prints it and
exits with 2).

Importing this module imports no torch (``vtoken --help`` stays fast); the checks that need the
registry or torch import them when they run."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re

#: The budgets of the default sweep: the 192 / 128 / 64-of-576 points of the literature, and unpruned.
DEFAULT_BUDGETS = ("1", "1/3", "2/9", "1/9")
#: Questions a sweep answers unless told otherwise (``--limit``).
DEFAULT_LIMIT = 500
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def split_list(values: list[str] | None, flag: str = "the list") -> list[str] | None:
    """``["1,1/9", "2/9"]`` -> ``["1", "1/9", "2/9"]``: lists may be given space or comma separated.
    A list given with nothing in it is refused (it would otherwise mean the default)."""
    if values is None:
        return None
    items = [item.strip() for value in values for item in value.split(",")]
    items = [item for item in items if item]
    if not items:
        raise ValueError(f"{flag} was given without a value; name at least one, or leave {flag} out for the default")
    return list(dict.fromkeys(items))  # one row each: a name given twice is measured once


def shipped_path(path: str | None) -> str | None:
    """``path`` itself, or, where it names a model the package ships (``vtoken/assets/<name>``, as the
    help and the README write it) and no such path exists from here, that model in the installed
    package: the shipped models are found from any working directory."""
    if path is None or os.path.exists(os.path.expanduser(path)):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 3 and parts[:2] == ["vtoken", "assets"]:
        installed = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", *parts[2:])
        if os.path.isdir(installed):
            return installed
    return path


def is_shipped_default(path: str | None) -> bool:
    """Whether ``path`` is the tiny LLaVA the package ships (the default model), named by its path."""
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-llava")
    return (path is not None and os.path.isdir(os.path.expanduser(path)) and os.path.isdir(shipped)
            and os.path.samefile(os.path.expanduser(path), shipped))


def check_bench_arguments(args):
    """Every ``vtoken bench`` argument checked before any model runs: (methods, budgets, trained
    pairs, config pairs), lists split; ``args.model`` is resolved by :func:`shipped_path`."""
    methods = check_methods(split_list(args.methods, "--methods"))
    budgets = check_budgets(split_list(args.budgets, "--budgets"))
    trained = check_pairs(args.trained, "--trained", "METHOD=DIR, e.g. tokenpacker=path/to/weights")
    configs = check_pairs(args.configs, "--configs", "LABEL=DIR, e.g. 'vflowopt (tuned)'=path/to/config")
    args.model = shipped_path(args.model)
    if is_shipped_default(args.model):
        args.model = None  # the default model named by its path: the same sweep, with its shipped weights
    check_model(args.model)
    for flag, value, most in (("--limit", args.limit, MOST["limit"]), ("--repeats", args.repeats, MOST["repeats"]),
                              ("--batch-size", args.batch, MOST["batch"])):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
        if value > most:
            raise ValueError(f"{flag} must be at most {most:,}, got {value:,}")
    check_threads(args.threads)
    check_out(args.out)
    if args.data is not None:
        check_data(args.data)
    check_device(args.device, args.attn)
    check_trained_and_configs(trained, configs)
    if methods:
        needs_weights = set(trained_methods()) - set(dict(trained or {}))
        missing = [m for m in methods if m in needs_weights]
        if missing and args.model is not None:
            raise ValueError(f"{missing[0]} needs trained weights for this model: add --trained {missing[0]}=DIR "
                             "(train them with vtoken train-projector)")
    check_model_download(args.model)
    return methods, budgets, trained, configs


#: The largest counts ``--limit``, ``--repeats`` and ``--batch-size`` take (a count past them ran until
#: killed, growing memory, instead of being refused).
MOST = {"limit": 1_000_000, "repeats": 10_000, "batch": 4096}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ATTENTION_NAMES = ("sdpa", "eager", "flash_attention_2")


def check_run_arguments(methods, budgets, model_path, repeats, batch, data, limit, trained, configs, device, dtype,
                        attn) -> tuple[list[str] | None, list[str], list | None, list | None, str | None]:
    """``vtoken.bench.run``'s arguments as Python gives them, checked as ``vtoken bench`` checks its
    flags and before any model loads: (methods, budgets as text, trained pairs, config pairs, model
    path), names given twice measured once. Each bad value is a one-line ValueError naming the
    argument (``limit=0``: an IndexError from the sweep's first batch before)."""
    def names(value, argument: str, example: str) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, (list, tuple)):  # 'fastv' is not ['f', 'a', ...]
            raise ValueError(f"{argument} must be a list, e.g. {argument}={example}, got {value!r}")
        if not value:
            raise ValueError(f"{argument}=[] names nothing; name at least one, or leave {argument} out for the default")
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"{argument} must be a list of strings, e.g. {argument}={example}, got {value!r}")
        return list(dict.fromkeys(value))

    methods = check_methods(names(methods, "methods", "['fastv', 'pool']"))
    budgets = check_budgets(names([str(b) for b in budgets] if isinstance(budgets, (list, tuple)) else budgets,
                                  "budgets", "['1', '1/9', '64']"))
    for argument, value in (("limit", limit), ("repeats", repeats), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MOST[argument]:
            raise ValueError(f"{argument} must be a whole number from 1 to {MOST[argument]:,}, got {value!r}")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)} (or None for the checkpoint's), got {dtype!r}")
    if attn is not None and attn not in ATTENTION_NAMES:
        raise ValueError(f"attn must be one of {', '.join(ATTENTION_NAMES)} (or None for the model's default), "
                         f"got {attn!r}")
    check_device(device, attn)
    if data is not None:
        check_data(os.fspath(data))
    pairs = []
    for argument, value, example in (("trained", trained, "[('tokenpacker', 'path/to/weights')]"),
                                     ("configs", configs, "[('vflowopt (tuned)', 'path/to/config')]")):
        if value is None:
            pairs.append(None)
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            raise ValueError(f"{argument} must be a list of (name, directory) pairs, e.g. {argument}={example}, "
                             f"got {value!r}")
        pairs.append(check_pairs([f"{name}={os.fspath(path)}" for name, path in value], f"--{argument}", example))
    trained, configs = pairs
    check_trained_and_configs(trained, configs)
    if model_path is not None:
        model_path = shipped_path(os.fspath(model_path))
        if is_shipped_default(model_path):
            return methods, budgets, trained, configs, None  # the default model, with its shipped weights
        check_model(model_path, "model_path=")
        check_model_download(model_path, "model_path=")
    return methods, budgets, trained, configs, model_path


def check_trained_and_configs(trained: list[tuple[str, str]] | None, configs: list[tuple[str, str]] | None) -> None:
    """The (method, weights) and (label, config) pairs, whichever are given: trained methods with
    their weights files, configs vtoken.load reads under labels of their own."""
    if trained:
        check_methods([m for m, _ in trained], trained=True)
        check_trained_weights(trained)
    if configs:
        check_configs(configs)


def check_pairs(values: list[str] | None, flag: str, example: str) -> list[tuple[str, str]] | None:
    """``["a=DIR", ...]`` -> ``[("a", "DIR"), ...]``; every DIR must be an existing directory."""
    if values is None:
        return None
    pairs = []
    for item in values:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: write {example}")
        key, path = item.split("=", 1)
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {item!r}: no such directory {path!r}")
        pairs.append((key.strip(), path))
    return pairs


def check_threads(threads: int | None) -> None:
    """``--threads``: a positive count, or left out for torch's default."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads} (leave it out for torch's default)")
    most = 4 * (os.cpu_count() or 1)
    if threads is not None and threads > most:  # (100000 threads: a MemoryError with no message)
        raise ValueError(f"--threads must be at most {most} on this machine ({os.cpu_count()} CPUs), got {threads}")


def check_out(path: str, flag: str = "--out") -> None:
    """``path`` is a directory, or one can be made there: nothing on the way to it is a file, and a
    file can be written there (probed, then the directories the probe made are removed: only those,
    never one that was there before)."""
    if not path:
        raise ValueError(f"{flag} is empty; give a directory (created if missing)")
    target = os.path.abspath(path)  # '..' resolved: 'new/..' is the folder it names, which exists
    missing = []  # the directories on the way that do not exist yet, innermost first
    existing = target
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == target else f" ({existing!r} is)"
        raise ValueError(f"{_subject(flag, path)}: not a directory{where}; give a directory (created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{_subject(flag, path)}: {existing!r} is not writable; give a directory you can write to")
    # Permission bits do not tell everything (root, /proc, a read-only mount): make it and write there now,
    # rather than fail when the first result is written, then take back what was made.
    import shutil
    import tempfile

    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as error:
        raise ValueError(f"{_subject(flag, path)}: cannot write there ({error.strerror or error}); give a directory "
                         "you can write to") from None
    finally:
        if missing and os.path.isdir(missing[-1]):  # the outermost directory the probe made, and below it
            shutil.rmtree(missing[-1], ignore_errors=True)


def check_trained_weights(trained: list[tuple[str, str]]) -> None:
    """Every ``--trained METHOD=DIR`` holds the weights files ``vtoken train-projector`` writes."""
    from vtoken.packer import CONFIG_NAME, WEIGHTS_NAME

    for method, path in trained:
        if method != "tokenpacker":
            continue
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise ValueError(f"--trained {method}={path}: the directory holds no {missing[0]} (give the --out "
                             "directory of vtoken train-projector)")


def check_configs(configs: list[tuple[str, str]]) -> None:
    """Every ``--configs LABEL=DIR`` holds a config ``vtoken.load`` reads."""
    import vtoken
    from vtoken.config import CONFIG_FILE

    seen = set()
    for label, path in configs:
        # A label names the config's row and its curve: one given twice, or a method's own name, would
        # put two setups on one curve (the ranking then reads one's point as the other's); a '|' would
        # split bench.md's table cell.
        if not label or "|" in label:
            raise ValueError(f"--configs {label}={path}: give a label without '|', e.g. 'vflowopt (tuned)'={path}")
        if label in seen:
            raise ValueError(f"--configs: the label {label!r} is given twice; give each config its own label")
        if label in public_methods():
            raise ValueError(f"--configs {label}={path}: {label!r} is a method's own name (its default rows); "
                             f"label the config apart, e.g. '{label} (mine)'={path}")
        seen.add(label)
        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise ValueError(f"--configs {label}={path}: the directory holds no {CONFIG_FILE} (write one with "
                             "vtoken.save_config(model, DIR))")
        try:
            vtoken.load(path)
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"--configs {label}={path}: not a usable config: {error}") from None


#: The ``model_type`` of the vision-language models vtoken's adapters serve (what ``--model`` may hold).
VISION_LANGUAGE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                               "qwen3_vl_moe")
#: Vision-only towers vtoken serves (their config has no ``vision_config``: it is the vision config).
VISION_ONLY_MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")


def _subject(flag: str, path: str) -> str:
    """How an error names the model argument: ``--model 'x'``, or ``pretrained='x'`` for a key=value flag."""
    return f"{flag}{path!r}" if flag.endswith("=") else f"{flag} {path!r}"


def check_model(path: str | None, flag: str = "--model") -> dict | None:
    """A local model directory holding a config, or something shaped like a hub id; returns the local
    directory's config (None for a hub id). ``flag`` names the argument in the errors (the lmms-eval
    plugin's is ``pretrained=``)."""
    if path is None:
        return None
    local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") > 1
    if local:
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"{_subject(flag, path)}: no such directory (give a local model directory or a hub id "
                             "such as llava-hf/llava-1.5-7b-hf)")
        config_path = os.path.join(os.path.expanduser(path), "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{_subject(flag, path)}: the directory holds no config.json (save the model there with "
                             "save_pretrained)")
        try:
            with open(config_path) as f:
                config = json.load(f)
            model_type = config.get("model_type")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{_subject(flag, path)}: config.json is not a model config ({error})") from None
        # Only a model with no vision part at all is refused here: a vision-language family vtoken
        # has no adapter for is named, with the supported ones, when it loads; a vision-only model
        # is told what the benchmark measures.
        if "vision_config" not in config and model_type not in VISION_ONLY_MODEL_TYPES:
            raise ValueError(f"{_subject(flag, path)} holds a {model_type!r} model; vtoken needs a vision-language model "
                             f"({', '.join(VISION_LANGUAGE_MODEL_TYPES)})")
        return config
    if not _HUB_ID.match(path):
        raise ValueError(f"{_subject(flag, path)} is neither a local directory nor a hub id (owner/name)")
    return None


def check_model_download(path: str | None, flag: str = "--model") -> None:
    """A hub id (``path`` that :func:`check_model` let through and no local directory) whose files the
    hub can serve now, or has served before: refused in one line otherwise, where transformers would
    retry five times, printing a line each, before failing. The last of the checks (it may wait for
    the network a few seconds); ``flag`` as in :func:`check_model`."""
    if path is None or os.path.isdir(os.path.expanduser(path)):
        return
    unreachable = hub_unreachable(path)
    if unreachable:
        raise ValueError(f"{_subject(flag, path)} is no local directory and the Hugging Face hub cannot download it: "
                         f"{unreachable}; give a local model directory (written by save_pretrained), or run where "
                         "the hub is reachable (HF_HUB_OFFLINE=1 uses the files downloaded before)")


#: Environment variables that route the hub's requests through a proxy (a direct probe says nothing then).
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(repo_id: str, timeout: float = 5.0) -> str | None:
    """Why the hub cannot serve ``repo_id``'s files now, or None: offline mode asks for the cache (and
    transformers says so itself), a proxy is configured, the hub's endpoint accepts a connection, or the
    model's config is in the local cache (loading falls back to it)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return None
    except OSError as error:
        reason = f"{constants.ENDPOINT} cannot be reached ({error.strerror or error})"
    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
    except Exception:  # an id the cache cannot hold: the hub's answer would be the same
        pass
    return reason


def public_methods() -> list[str]:
    from vtoken.registry import strategy_names

    return [name for name in strategy_names() if not name.startswith("_")]


def trained_methods() -> list[str]:
    from vtoken.registry import get_strategy

    return [name for name in public_methods() if get_strategy(name).trained]


def check_methods(methods: list[str] | None, trained: bool = False) -> list[str] | None:
    """``methods`` if every one is registered (and trained, when ``trained``)."""
    if methods is None:
        return None
    known = public_methods()
    for name in methods:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
        if trained and name not in trained_methods():
            raise ValueError(f"--trained {name}: {name} is not a trained method (trained: "
                             f"{', '.join(trained_methods())}); give it with --methods instead")
    return methods


def check_budgets(budgets: list[str]) -> list[str]:
    from vtoken.bench import parse_budget

    for budget in budgets:
        parse_budget(budget)
    return budgets


def check_data(path: str) -> None:
    """Read the whole JSONL file now: a malformed line names the file and line before anything runs."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file (give a JSONL file, one record per line)")
    stat = os.stat(path)
    if not _record_count(os.path.abspath(path), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size):
        raise ValueError(f"--data {path!r}: the file holds no records")


@functools.lru_cache(maxsize=8)
def _record_count(path: str, mtime_ns: int, ctime_ns: int, size: int) -> int:
    """The records of a JSONL file as it is now (its modification and change times and its size are
    in the key): ``vtoken bench`` checks its flags and then ``bench.run`` checks its arguments, and a
    file read (every record's image opened) once by the first is not read again by the second."""
    from vtoken.vqa.data import load_jsonl

    return len(load_jsonl(path))


def check_device(device: str | None, attn: str | None) -> None:
    """The device exists here, and FlashAttention 2 has what it needs."""
    if device is not None:
        import torch

        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; write cpu, cuda, cuda:N or mps") from None
        if parsed.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"--device {device}: the bench runs on cpu, cuda or mps; write cpu, cuda, cuda:N or mps")
        if parsed.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if parsed.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("--attn flash_attention_2 needs the flash-attn package (pip install flash-attn) "
                             "and a CUDA device; use --attn sdpa otherwise")
        if device is None or not device.startswith("cuda"):
            raise ValueError("--attn flash_attention_2 runs on CUDA only: add --device cuda, or use --attn sdpa")


#: The region sides ``vtoken train-projector`` trains (TokenPacker's: 1/4, 1/9, 1/16 of the visual tokens).
PACKER_SCALES = (2, 3, 4)


def check_train_projector_arguments(args) -> None:
    """Every ``vtoken train-projector`` argument that can be checked before the model loads
    (``args.model`` resolved by :func:`shipped_path`)."""
    args.model = shipped_path(args.model)
    config = check_model(args.model)
    if config is not None:  # what train_projector refuses once the model is loaded, read from its config
        if config.get("model_type") != "llava":
            raise ValueError(f"--model {args.model!r} holds a {config.get('model_type')!r} model; train-projector "
                             "trains TokenPacker for LLaVA-1.5-style models (model_type 'llava'; LLaVA-NeXT's AnyRes "
                             "grids are not supported)")
        if config.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError(f"--model {args.model!r} keeps the CLS token among its visual tokens "
                             f"(vision_feature_select_strategy={config['vision_feature_select_strategy']!r}); "
                             "TokenPacker packs the patch grid only: use a model with 'default'")
    if args.data != "generated":
        if not os.path.isfile(args.data):
            raise ValueError(f"--data {args.data!r}: no such file (give a JSONL file, one record per line, or "
                             "'generated')")
        check_data(args.data)
    check_out(args.out)
    if args.scale not in PACKER_SCALES:
        raise ValueError(f"--scale {args.scale}: write 2, 3 or 4 (s x s patches become one token: 1/4, 1/9 or "
                         "1/16 of the visual tokens)")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps} (leave it out to train --epochs over "
                         "the data)")
    if not 0 < args.epochs < float("inf"):
        raise ValueError(f"--epochs must be a positive number, got {args.epochs}")
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    for flag, value in (("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum), ("--n", args.n)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be 0 (checkpoint at the end only) or more, got {args.save_every}")
    if args.init not in ("random", "projector") and not os.path.isdir(args.init):
        raise ValueError(f"--init {args.init!r}: write random, projector or a packer directory (stage 2)")
    if args.init not in ("random", "projector"):
        from vtoken.packer import CONFIG_NAME, WEIGHTS_NAME

        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(args.init, name))]
        if missing:
            raise ValueError(f"--init {args.init!r}: the directory holds no {missing[0]} (give the --out directory of "
                             "an earlier vtoken train-projector run, or random / projector)")
    check_threads(args.threads)
    check_model_download(args.model)
