"""The flags more than one verb takes, and the values they build: one flag per Python parameter,
its name in kebab-case (``max_reasoning_tokens`` -> ``--max-reasoning-tokens``). Nothing outside
:mod:`codestop.cli` parses a command line."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from codestop.config import OLD_NAMES, PROBE_MODES, GenerationConfig, cli_fields
from codestop.errors import CodestopError
from codestop.eval.datasets import DATASETS
from codestop.eval.prompts import DEFAULT_STYLE, PROMPT_STYLES, QUESTION_SLOT
from codestop.policies import METHOD_OPTIONS, METHODS, Policy, knob_help, knob_type, make_policy
from codestop.policy_file import PolicyFile, read_policy_file

if TYPE_CHECKING:
    from codestop.engines.base import Engine


def add_model_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=required, help="hub id, local HF directory, .gguf file, or preset name")
    g.add_argument("--engine", default=None, help="transformers, llamacpp or server (default: from the model's format)")
    g.add_argument("--dtype", default="auto", help="transformers dtype: auto, float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="transformers device: auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the free cores)")
    g.add_argument("--base-url", action="append", default=None,
                   help="an OpenAI-compatible completions server (engine server); repeat it for replicas of one "
                        "model: each question stays on one replica, a failed replica is skipped until it is back")
    g.add_argument("--api-key", default=None,
                   help="the completions server's API key (default $CODESTOP_UPSTREAM_API_KEY, else $OPENAI_API_KEY)")
    g.add_argument("--tokenizer", default=None, help="the server model's tokenizer (token-id prompts)")


# every policy knob, of any method (one flag each)
POLICY_KNOBS = tuple(sorted({k for opts in METHOD_OPTIONS.values() for k in opts}))


def add_policy_options(parser: argparse.ArgumentParser, default_method: str = "codestop") -> None:
    """``--method`` and one flag per policy knob, from the policies' own fields, or ``--policy-file``."""
    g = parser.add_argument_group("stopping policy")
    g.add_argument("--method", default=None, help=f"{', '.join(METHODS)} (default {default_method})")
    for name, help_text in knob_help().items():
        g.add_argument("--" + name.replace("_", "-"), type=knob_type(name), default=None, help=help_text)
    g.add_argument("--policy-file", default=None, metavar="FILE",
                   help="the method and knobs from a policy file (`codestop calibrate --out`), instead of --method and knob flags")
    parser.set_defaults(default_method=default_method)


def policy_file_from_args(args: argparse.Namespace) -> PolicyFile:
    """The policy the flags ask for: ``--policy-file``'s, with its guarantee, or the method and knob
    flags' (uncalibrated; a knob that is not the method's own is an error where the policy is
    built). Both given is an error: which would win is unclear."""
    given = {k: getattr(args, k) for k in POLICY_KNOBS if getattr(args, k, None) is not None}
    if getattr(args, "policy_file", None) is None:
        return PolicyFile({"method": args.method or getattr(args, "default_method", "codestop"), **given})
    flags = (["--method"] if args.method is not None else []) + ["--" + k.replace("_", "-") for k in given]
    if flags:
        raise CodestopError(f"--policy-file: give either a policy file or {', '.join(flags)}, not both")
    return read_policy_file(args.policy_file)


def policy_from_args(args: argparse.Namespace) -> Policy:
    return make_policy(policy_file_from_args(args).policy)


def engine_from_args(args: argparse.Namespace) -> Engine:
    from codestop.models import load_engine

    return load_engine(args.model, engine=args.engine, **engine_options_from_args(args))


def engine_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the model flags set (auto values left to the engine)."""
    return {
        k: getattr(args, k)
        for k in ("dtype", "device", "threads", "base_url", "api_key", "tokenizer")
        if getattr(args, k, None) is not None and getattr(args, k) != "auto"
    }


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_boundaries(text: str) -> tuple[str, ...]:
    """``"\\n\\n,Wait"`` (escapes allowed) to ``("\\n\\n", "Wait")``."""
    return tuple(b.encode().decode("unicode_escape") for b in text.split(","))


_FLAG_TYPES: dict[str, Any] = {
    "max_reasoning_tokens": int, "probe_interval": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
    "family": str, "enable_thinking": parse_bool, "boundaries": parse_boundaries, "answer": str,
    "probe_mode": str,
}


def add_generation_options(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """One flag per CLI field of :class:`GenerationConfig` (``max_reasoning_tokens`` -> ``--max-reasoning-tokens``);
    ``defaults`` overrides the config's defaults for this verb (shown in the help)."""
    g = parser.add_argument_group("generation")
    for f in cli_fields():
        default = defaults.get(f.name)
        help_text = f.metadata["help"]
        if default is None and f.default is not None and not isinstance(f.default, tuple) and f.name != "answer":
            help_text += f" (default {f.default})"
        elif default is not None:
            help_text += f" (default here {default})"
        kwargs: dict[str, Any] = {"type": _FLAG_TYPES[f.name], "default": default, "help": help_text}
        if f.name == "enable_thinking":
            kwargs["metavar"] = "{true,false}"
        if f.name == "probe_mode":
            kwargs["choices"] = PROBE_MODES
        flags = ["--" + f.name.replace("_", "-")]
        flags += ["--" + old.replace("_", "-") for old, new in OLD_NAMES.items() if new == f.name]  # still accepted
        g.add_argument(*flags, dest=f.name, **kwargs)


def config_from_args(args: argparse.Namespace, **fixed: Any) -> GenerationConfig:
    """The generation config of the flags :func:`add_generation_options` added (unset flags keep
    the defaults); ``fixed`` are values the verb sets itself."""
    values = {f.name: getattr(args, f.name) for f in cli_fields() if getattr(args, f.name, None) is not None}
    return GenerationConfig(**{**values, **fixed})


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prompt")
    g.add_argument(
        "--prompt", default=None, metavar="STYLE|FILE",
        help=f"how the question is asked: {', '.join(PROMPT_STYLES)} (default {DEFAULT_STYLE}), or a text file "
        f"holding the whole user message with a {QUESTION_SLOT} slot",
    )
    g.add_argument("--system-prompt", default=None, metavar="TEXT", help="a system message for every question")


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help=f"{', '.join(DATASETS)} (from the Hugging Face hub unless --data)")
    g.add_argument("--data", default=None, help="a local JSONL/CSV copy, or any file with question and answer columns")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions (after --offset)")
    g.add_argument("--offset", type=int, default=0, help="skip the first N questions (e.g. a dev split's)")
    g.add_argument("--split", default=None, help='a name for the questions chosen, written into every record (e.g. "held-out")')
    g.add_argument("--questions-in-flight", dest="questions_in_flight", type=int, default=1, metavar="N",
                   help="questions answered at once (for server engines; each question is one session)")
    add_old_flag(g, "--concurrency", "--questions-in-flight", dest="questions_in_flight", type=int,
                 why="eval's --concurrency counted questions, serve's counts upstream requests")


class OldFlag(argparse.Action):
    """A flag's old name, still taken for one release: sets the new flag's value and prints one
    deprecation line to stderr."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", why: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        print(f"codestop: {option_string} is deprecated; use {self.new} ({self.why})", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_old_flag(group: Any, old: str, new: str, dest: str, why: str, **kwargs: Any) -> None:
    """``old`` as a deprecated spelling of the flag ``new`` (which sets ``dest``), hidden from the help."""
    group.add_argument(old, dest=dest, action=OldFlag, new=new, why=why, help=argparse.SUPPRESS, **kwargs)


def add_probe_interval_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-interval", type=int, default=None,
                        help="replay as if probed at least this many reasoning tokens apart (default: every recorded probe)")
