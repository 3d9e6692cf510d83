"""``esft-peft``: the command-line pipeline (score -> select -> train -> merge / push / convert, and a demo).

Models are Hub ids or local directories; data is a local JSONL/JSON/CSV/parquet file (or directory) or a
datasets Hub id. Errors end in one line on stderr (exit 2 for bad arguments, 1 for failures); ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from ..conversations import encode_conversation
from ..defaults import EXPERT_CONFIG_NAME, PAPER_SEQUENCE_LENGTH, PAPER_TOKEN_BUDGET, PAPER_TOP_P
from ..quiet import quiet_libraries
from .pesc import add_pesc_arguments, given_pesc_options
from .sources import CLIError, check_model_source, hub_or_local, load_model, load_tokenizer, model_reference

logger = logging.getLogger("esft_peft.cli")

DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLE_LINE = '{"text": "Question: 2+2? Answer: 4"}'
IGNORE_INDEX = -100
EXAMPLES = """examples:
  esft-peft score --model deepseek-ai/ESFT-vanilla-lite --data train.jsonl --out scores.json --heatmap scores.png
  esft-peft select --scores scores.json --score-function token --top-p 0.2 --out expert_cfg.json
  esft-peft train --model deepseek-ai/ESFT-vanilla-lite --data train.jsonl --expert-config expert_cfg.json --out adapter
  esft-peft train --method pesc --model meta-llama/Llama-3.2-1B --data train.jsonl --num-experts 8 --out pesc-adapter
  esft-peft merge --base deepseek-ai/ESFT-vanilla-lite --adapter adapter --out merged
  esft-peft push --adapter adapter --repo my-org/my-esft-adapter
  esft-peft convert --from-official official_dir --base deepseek-ai/ESFT-vanilla-lite --out adapter
  esft-peft export-lora --adapter adapter --out lora-adapter
  esft-peft demo --out demo_run
"""


def load_records(data: str, split: str = "train", limit: Optional[int] = None):
    """A ``datasets.Dataset`` from a local file/directory or a datasets Hub id."""
    from datasets import load_dataset

    path = Path(data)
    if path.is_file():
        fmt = DATA_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise CLIError(f"unsupported data file {data}: use one of {', '.join(DATA_FORMATS)}")
        if path.stat().st_size == 0 or not path.read_bytes().strip():
            raise CLIError(f"data file {data} is empty; it needs one example per line, e.g. {SAMPLE_LINE}")
        dataset = load_dataset(fmt, data_files=str(path), split="train")
    elif path.is_dir():
        dataset = load_dataset(str(path), split=split)
    elif path.suffix.lower() in DATA_FORMATS or path.is_absolute() or data.startswith("."):
        raise CLIError(f"data file not found: {data}")
    else:
        dataset = load_dataset(data, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise CLIError(f"data {data} holds no examples; it needs one example per line, e.g. {SAMPLE_LINE}")
    return dataset


def _column(dataset, name: str, option: str):
    if name not in dataset.column_names:
        hint = ""
        conversations = [column for column in dataset.column_names if _holds_conversations(dataset, column)]
        if option == "--text-column" and conversations:
            hint = f"; column {conversations[0]!r} holds conversations: pass --messages-column {conversations[0]}"
        raise CLIError(f"{option} {name!r} is not a column of the data; columns: {', '.join(dataset.column_names)}"
                       f"{hint}")
    return dataset[name]


def _holds_conversations(dataset, column: str) -> bool:
    """Whether the first example's ``column`` is a chat conversation ([{role, content}, ...])."""
    value = dataset[0][column] if len(dataset) else None
    return (isinstance(value, list) and bool(value)
            and all(isinstance(turn, dict) and {"role", "content"} <= set(turn) for turn in value))


def encode_messages(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool) -> dict[str, list[int]]:
    """Token ids and labels of one conversation; only assistant turns are labelled unless ``train_on_prompt``."""
    ids, labels = encode_conversation(tokenizer, messages, train_on_prompt)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def training_dataset(dataset, tokenizer, args: argparse.Namespace):
    """Tokenised training examples (``input_ids``, ``labels``) from the text or messages column."""
    if args.messages_column:
        if not tokenizer.chat_template:
            raise CLIError("the tokenizer has no chat template; pass --chat-template FILE or use --text-column")
        _column(dataset, args.messages_column, "--messages-column")
        encode = lambda row: encode_messages(  # noqa: E731
            tokenizer, list(row[args.messages_column]), args.max_length, args.train_on_prompt
        )
    else:
        _column(dataset, args.text_column, "--text-column")

        def encode(row):
            ids = tokenizer(str(row[args.text_column]), truncation=True, max_length=args.max_length)["input_ids"]
            return {"input_ids": ids, "labels": list(ids)}

    encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising")
    supervised = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in encoded["labels"])
    if supervised == 0:
        column = args.messages_column or args.text_column
        raise CLIError(
            f"the data gives no token to train on: every example of column {column!r} is empty (or, with "
            "--messages-column, has no assistant reply). Check the column and the data file"
        )
    return encoded


def _check_out(args: argparse.Namespace, *inputs: Optional[str], directory: bool = True, out: Optional[str] = None) -> None:
    """Refuse, before any work, an output that would replace user files or overlap an input."""
    from ..files import OutputPathError, check_output_path

    try:
        check_output_path(out or args.out, inputs=inputs, overwrite=args.overwrite, directory=directory)
    except OutputPathError as error:
        raise CLIError(str(error)) from None


# ---------------------------------------------------------------------------------------------------- commands


def cmd_score(args: argparse.Namespace) -> None:
    from ..scoring.plotting import plot_scores
    from ..scoring.score import score_experts

    _check_out(args, args.model, args.data, directory=False)
    if args.heatmap:
        _check_out(args, args.model, args.data, directory=False, out=args.heatmap)
    tokenizer = load_tokenizer(args.model, args.chat_template)
    dataset = load_records(args.data, args.split, args.limit)
    if args.messages_column:
        _column(dataset, args.messages_column, "--messages-column")
        if not tokenizer.chat_template:
            raise CLIError("the tokenizer has no chat template; pass --chat-template FILE or use --text-column")
    else:
        _column(dataset, args.text_column, "--text-column")
    model = load_model(args.model, args.dtype, args.device)
    scores = score_experts(
        model, dataset, tokenizer=tokenizer, token_budget=args.token_budget, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, average=args.average, mask_prompt=not args.count_prompt,
        text_column=args.text_column, messages_column=args.messages_column or "messages",
    )
    scores.save(args.out)
    tokens = scores.metadata["num_tokens"]
    left = len(dataset) - scores.num_sequences
    budget = f"; the token budget ({args.token_budget:,}) left {left} of {len(dataset)} examples unscored" if left > 0 \
        else ""
    print(f"expert scores of {scores.num_sequences} examples ({tokens:,} tokens{budget}) -> {args.out}")
    if args.heatmap:
        plot_scores(scores, path=args.heatmap, selection=scores.select("token"))
        print(f"heatmap -> {args.heatmap}")


def cmd_select(args: argparse.Namespace) -> None:
    from ..scoring.scores import ExpertScores
    from ..tuners.esft.config import ESFTConfig

    if not Path(args.scores).is_file():
        raise CLIError(f"scores file not found: {args.scores}")
    _check_out(args, args.scores, directory=False)
    scores = ExpertScores.load(args.scores)
    if args.model:
        scores.check_compatible(_model_structure(args.model, args.trust_remote_code))
    experts = scores.select(score_function=args.score_function, top_p=args.top_p, top_k=args.top_k,
                            budget=args.budget)
    config = ESFTConfig(experts=experts, train_shared_experts=args.shared_experts,
                        train_non_expert_modules=args.non_expert_modules)
    config.save_expert_config(args.out)
    count = sum(len(ids) for ids in experts.values())
    rule = f"top-k {args.top_k}" if args.top_k else f"budget {args.budget}" if args.budget else f"p={args.top_p}"
    print(f"selected {count} experts in {len(experts)} MoE layers ({args.score_function} scores, {rule}) -> {args.out}")


def _model_structure(name_or_path: str, trust_remote_code: bool):
    """The model's modules on the meta device (its config only; no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with hub_or_local(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def cmd_train(args: argparse.Namespace) -> None:
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer

    from ..interop.hub import adapter_statistics, readable_size
    from ..training import ExpertWeightDecayCallback, esft_training_arguments, gather_adapter_state_dict
    from ..tuners.esft.config import ESFTConfig
    from .train_common import save_trained_adapter, training_overrides

    if args.method == "pesc":
        from .pesc import pesc_config, train_pesc

        pesc_config(args)  # bad settings fail before anything is loaded
        _check_out(args, args.model, args.data, args.chat_template)
        tokenizer = load_tokenizer(args.model, args.chat_template)
        dataset = training_dataset(load_records(args.data, args.split, args.limit), tokenizer, args)
        train_pesc(args, tokenizer, dataset)
        return
    pesc_only = given_pesc_options(args)
    if pesc_only:
        raise CLIError(f"{', '.join(pesc_only)} configure --method pesc and do nothing with --method esft; drop them, "
                       "or pass --method pesc to craft a dense model")
    if args.expert_config is None:
        raise CLIError("--expert-config is required with --method esft")
    if not Path(args.expert_config).is_file():
        raise CLIError(f"expert config not found: {args.expert_config}")
    _check_out(args, args.model, args.data, args.expert_config, args.chat_template)
    if args.delta_alpha is not None and args.delta_rank is None:
        raise CLIError("--delta-alpha sets the scale of low-rank deltas; pass --delta-rank R with it")
    if args.delta_rank is not None and args.decay_expert_weights:
        raise CLIError("--decay-expert-weights acts on full-rank deltas (W + delta); drop it with --delta-rank")
    config = ESFTConfig.from_expert_config(args.expert_config, base_model_name_or_path=model_reference(args.model),
                                           delta_rank=args.delta_rank, delta_alpha=args.delta_alpha)
    tokenizer = load_tokenizer(args.model, args.chat_template)
    dataset = training_dataset(load_records(args.data, args.split, args.limit), tokenizer, args)
    model = get_peft_model(load_model(args.model, args.dtype, args.device), config)
    stats = adapter_statistics(model)
    if int(os.environ.get("RANK", "0")) == 0:  # launched processes set RANK; Trainer's state does not exist yet
        rank = f" at rank {config.delta_rank} (alpha {config.delta_alpha:g})" if config.delta_rank else ""
        print(f"training {config.num_selected_experts} experts{rank}: {stats['adapter_parameters']:,} parameters "
              f"({stats['trainable_fraction']:.2%} of the model, {readable_size(stats['adapter_bytes'])} adapter)")
    overrides: dict[str, Any] = training_overrides(args)
    if args.no_gradient_checkpointing:
        overrides["activation_checkpointing"] = False
    with tempfile.TemporaryDirectory(prefix="esft-train-") as work:
        training_args = esft_training_arguments(work, **overrides)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        callbacks = [ExpertWeightDecayCallback()] if args.decay_expert_weights else []
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                          callbacks=callbacks)
        trainer.train()
    adapter_state = gather_adapter_state_dict(model)  # every process takes part (FSDP2/ZeRO-3 partitions)

    save_trained_adapter(args, trainer, model, tokenizer, state_dict=adapter_state,
                         extra=lambda tmp: config.save_expert_config(tmp / EXPERT_CONFIG_NAME))


def cmd_merge(args: argparse.Namespace) -> None:
    from peft import PeftModel

    from ..files import atomic_directory_write

    check_model_source(args.adapter)
    _check_out(args, args.base, args.adapter)
    base = load_model(args.base, args.dtype)
    with hub_or_local(args.adapter):
        adapter_model = PeftModel.from_pretrained(base, args.adapter)
    merged = adapter_model.merge_and_unload()
    tokenizer = _optional_tokenizer(args.base)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_directory_write(args.out, write, overwrite=args.overwrite)
    print(f"merged model -> {args.out}")


def _optional_tokenizer(name_or_path: str):
    try:
        return load_tokenizer(name_or_path)
    except (OSError, ValueError, TypeError):
        logger.info("no tokenizer found for %s; the merged directory holds the model only", name_or_path)
        return None


def _adapter_base(adapter: str, base: Optional[str]) -> str:
    from peft import PeftConfig

    if base:
        return base
    with hub_or_local(adapter):
        recorded = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not recorded:
        raise CLIError(f"the adapter {adapter} does not record its base model; pass --base")
    return recorded


def cmd_push(args: argparse.Namespace) -> None:
    from peft import PeftModel

    from ..interop.hub import push_adapter

    base = load_model(_adapter_base(args.adapter, args.base), args.dtype)
    with hub_or_local(args.adapter):
        model = PeftModel.from_pretrained(base, args.adapter)
    info = push_adapter(model, args.repo, private=args.private or None, token=args.token, revision=args.revision,
                        create_pr=args.create_pr, description=args.description)
    print(f"pushed {args.adapter} -> {getattr(info, 'commit_url', args.repo)}")


def cmd_convert(args: argparse.Namespace) -> None:
    from ..interop.official import convert_from_official, convert_to_official

    source = args.from_official or args.to_official
    if args.from_official and not Path(source).is_dir():
        raise CLIError(f"official adapter directory not found: {source}")
    if args.expert_config and not args.from_official:
        raise CLIError("--expert-config goes with --from-official (the expert config of the official adapter)")
    if args.expert_config and not Path(args.expert_config).is_file():
        raise CLIError(f"expert config not found: {args.expert_config}")
    if args.to_official:
        check_model_source(args.to_official)
    _check_out(args, source, args.base, args.expert_config)
    base = load_model(args.base, args.dtype, trust_remote_code=args.trust_remote_code)
    if args.from_official:
        convert_from_official(args.from_official, base, args.out, base_model_name_or_path=model_reference(args.base),
                              expert_config=args.expert_config, overwrite=args.overwrite)
        print(f"official adapter {args.from_official} -> esft-peft adapter {args.out}")
    else:
        convert_to_official(args.to_official, base, args.out, overwrite=args.overwrite)
        print(f"esft-peft adapter {args.to_official} -> official adapter {args.out}")


def cmd_export_lora(args: argparse.Namespace) -> None:
    from ..interop.export_lora import error_table, export_lora
    from ..interop.hub import readable_size

    if not Path(args.adapter).is_dir():
        raise CLIError(f"adapter directory not found: {args.adapter}")
    _check_out(args, args.adapter, args.base)
    base = _adapter_base(args.adapter, args.base)
    with hub_or_local(base):
        result = export_lora(args.adapter, args.out, rank=args.rank, max_error=args.max_error, base_model=base,
                             skip_non_expert=args.skip_non_expert, layout=args.layout.replace("-", "_"),
                             trust_remote_code=args.trust_remote_code, overwrite=args.overwrite)
    quality = "exact (low-rank adapter)" if result.exact else f"max relative error {result.max_error:.2e}"
    print(f"peft LoRA adapter -> {args.out}: rank {result.rank}, alpha {result.alpha:g}, {quality}, "
          f"{readable_size(result.adapter_bytes)}")
    if not result.exact:
        print(error_table(result))


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo.run import main as demo_main

    demo_main(args.out, size="quick" if args.quick else "full", seed=args.seed)


# ---------------------------------------------------------------------------------------------------- parser


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and shows every option's default (unless its help already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if "default" in help_text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


def _add_out(parser: argparse.ArgumentParser, metavar: str, help_text: str) -> None:
    parser.add_argument("--out", required=True, metavar=metavar, help=help_text)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (default: refuse an existing non-empty --out)")


def _add_model(parser: argparse.ArgumentParser, flag: str = "--model", help_text: str = "Hub id or local directory "
               "of the base MoE model") -> None:
    parser.add_argument(flag, required=True, metavar="MODEL", help=help_text)
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype ('auto': the checkpoint's)")


def _add_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, metavar="DATA",
                       help="local .jsonl/.json/.csv/.parquet file or directory, or a datasets Hub id")
    group.add_argument("--split", default="train", help="dataset split for directories and Hub ids")
    group.add_argument("--limit", type=_positive_int, metavar="N", help="use only the first N examples (default: all)")
    columns = group.add_mutually_exclusive_group()
    columns.add_argument("--text-column", default="text", metavar="NAME", help="column with plain text")
    columns.add_argument("--messages-column", metavar="NAME",
                         help="column with chat conversations ([{role, content}, ...]) rendered by the chat template")
    group.add_argument("--chat-template", metavar="FILE",
                       help="Jinja chat template replacing the tokenizer's (default: the tokenizer's own)")
    group.add_argument("--max-length", type=_positive_int, default=PAPER_SEQUENCE_LENGTH, metavar="N",
                       help="truncate sequences to N tokens")


def build_parser() -> argparse.ArgumentParser:
    """The ``esft-peft`` argument parser with all subcommands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="esft-peft", description="Expert-Specialized Fine-Tuning (ESFT) for MoE models, as a peft method.",
        epilog=EXAMPLES, formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"esft-peft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and show other libraries' warnings and log records (hidden by "
                        "default)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_command = functools.partial(commands.add_parser, formatter_class=HelpFormatter)

    score = add_command("score", help="score expert relevance on task data",
                                description="Run the frozen model over task data and record, per MoE layer and "
                                "routed expert, the token selection ratio and the average gate score.")
    _add_model(score)
    _add_data(score)
    _add_out(score, "FILE", "scores JSON to write")
    score.add_argument("--heatmap", metavar="PNG", help="also write a layers x experts heatmap")
    score.add_argument("--token-budget", type=_positive_int, default=PAPER_TOKEN_BUDGET, metavar="N",
                       help="stop after N counted tokens (the paper's budget)")
    score.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="sequences per forward pass")
    score.add_argument("--seed", type=int, default=0, help="seed for sampling the data")
    score.add_argument("--average", choices=("tokens", "sequences"), default="tokens",
                       help="pool all tokens (official code) or average per sequence first (paper)")
    score.add_argument("--count-prompt", action="store_true",
                       help="with --messages-column: also count prompt (non-assistant) tokens, as the official code")
    score.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    score.set_defaults(func=cmd_score)

    select = add_command("select", help="select experts from scores (top-p per layer)",
                                 description="Per MoE layer, take experts in descending score order until their "
                                 "scores sum to at least p; write the official expert-config JSON.")
    select.add_argument("--scores", required=True, metavar="FILE", help="scores JSON written by `esft-peft score`")
    select.add_argument("--score-function", choices=("token", "gate"), default="token",
                        help="token selection ratio (ESFT-Token) or average gate score (ESFT-Gate)")
    rule = select.add_mutually_exclusive_group()
    rule.add_argument("--top-p", type=_probability, default=None, metavar="P",
                      help="per layer, experts until their scores sum to P (default, the paper's: "
                      f"{PAPER_TOP_P['token']} for token, {PAPER_TOP_P['gate']} for gate)")
    rule.add_argument("--top-k", type=_positive_int, metavar="K", help="the K best experts of every layer")
    rule.add_argument("--budget", type=_positive_int, metavar="N",
                      help="N experts in all: each layer's best, then the highest remaining scores")
    select.add_argument("--model", metavar="MODEL",
                        help="check the scores against this model's MoE layers and expert counts (reads its config "
                        "only)")
    select.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (with --model)")
    _add_out(select, "FILE", "expert config JSON to write")
    select.add_argument("--shared-experts", action="store_true", help="also train shared experts")
    select.add_argument("--non-expert-modules", action="store_true", help="also train all non-expert modules")
    select.set_defaults(func=cmd_select)

    train = add_command("train", help="train the selected experts (transformers Trainer)",
                                description="Train an ESFT adapter with the paper's hyper-parameters as defaults "
                                "(AdamW 0.9/0.95, weight decay 0.1, lr 1e-5, constant schedule, 500 steps).")
    _add_model(train)
    _add_data(train)
    train.add_argument("--method", choices=("esft", "pesc"), default="esft",
                       help="esft: train selected experts of an MoE (default); pesc: craft a dense model into a "
                       "mixture of adapter experts (see the PESC options)")
    train.add_argument("--expert-config", metavar="FILE", help="expert config JSON (official format; --method esft)")
    _add_out(train, "DIR", "adapter directory to write (written atomically, once training ends)")
    train.add_argument("--max-steps", type=_positive_int, metavar="N", help="optimizer steps (default: 500)")
    train.add_argument("--learning-rate", type=float, metavar="LR", help="learning rate (default: 1e-5)")
    train.add_argument("--batch-size", type=_positive_int, metavar="N", help="per-device batch size")
    train.add_argument("--gradient-accumulation-steps", type=_positive_int, metavar="N")
    train.add_argument("--seed", type=int, help="training seed")
    train.add_argument("--logging-steps", type=_positive_int, metavar="N",
                       help="log the loss every N steps (default: 10; the log is saved as trainer_state.json)")
    train.add_argument("--train-on-prompt", action="store_true",
                       help="with --messages-column: also compute the loss on non-assistant tokens")
    train.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, more activation memory")
    train.add_argument("--decay-expert-weights", action="store_true",
                       help="weight decay pulls the trained experts' weights toward zero, as the ESFT authors' AdamW "
                       "(default: it pulls the deltas toward zero, i.e. the experts toward their base weights)")
    train.add_argument("--delta-rank", type=_positive_int, metavar="R",
                       help="low-rank deltas: each selected expert's matrices get (alpha / R) * B @ A (default: "
                       "full-rank deltas)")
    train.add_argument("--delta-alpha", type=float, metavar="ALPHA",
                       help="scale numerator of low-rank deltas, scale = ALPHA / R (default: R, i.e. scale 1)")
    train.add_argument("--device", help="torch device (the Trainer picks one when omitted)")
    add_pesc_arguments(train)
    train.set_defaults(func=cmd_train)

    merge = add_command("merge", help="merge an adapter into its base and save a plain checkpoint",
                                description="Merge the adapter's deltas into the base weights and save a "
                                "transformers checkpoint with the base checkpoint's key layout.")
    _add_model(merge, "--base", "Hub id or local directory of the base model")
    merge.add_argument("--adapter", required=True, metavar="ADAPTER", help="adapter directory or Hub repo id")
    _add_out(merge, "DIR", "merged model directory to write (atomically)")
    merge.set_defaults(func=cmd_merge)

    push = add_command("push", help="upload an adapter with a generated model card to the Hub",
                               description="Upload adapter weights, adapter_config.json and a generated model "
                               "card (base model, expert map, trainable fraction, loading snippet) in one commit.")
    push.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    push.add_argument("--repo", required=True, metavar="ORG/NAME", help="Hub repository id")
    push.add_argument("--base", metavar="MODEL", help="base model (default: the one recorded in the adapter)")
    push.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the base in")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", help="Hub token (default: the logged-in one)")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--description", help="one paragraph for the model card")
    push.set_defaults(func=cmd_push)

    convert = add_command("convert", help="convert between official ESFT and esft-peft adapters",
                                  description="--from-official: official adapter (expert_cfg.json + full expert "
                                  "weights) -> esft-peft delta adapter. --to-official: the reverse.")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-official", metavar="DIR", help="official ESFT adapter directory")
    direction.add_argument("--to-official", metavar="ADAPTER", help="esft-peft adapter directory or Hub id")
    _add_model(convert, "--base", "Hub id or local directory of the base model")
    convert.add_argument("--expert-config", metavar="FILE",
                         help=f"with --from-official: the expert config, when the directory has no {EXPERT_CONFIG_NAME} "
                         "(the authors' train.py does not write one)")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="allow the base model's own code (e.g. the authors' DeepSeek-V2 remote code)")
    _add_out(convert, "DIR", "output directory (written atomically)")
    convert.set_defaults(func=cmd_convert)

    export = add_command("export-lora", help="export an ESFT adapter as a peft LoRA adapter (for serving engines)",
                         description="Write a peft LoraConfig adapter: target_parameters on fused experts (peft's "
                         "ParamWrapper layout, zeros for unselected experts) or target_modules on ModuleList experts. "
                         "Exact from a low-rank adapter; a full-rank adapter is truncated by SVD and the relative "
                         "error of every expert is printed.")
    export.add_argument("--adapter", required=True, metavar="DIR", help="esft-peft adapter directory")
    export.add_argument("--base", metavar="MODEL",
                        help="base model id or directory; only its config is read (default: the adapter's base)")
    export.add_argument("--rank", type=_positive_int, metavar="R",
                        help="LoRA rank (default: the adapter's delta rank, or for a full-rank adapter the smallest "
                        "rank within --max-error)")
    export.add_argument("--max-error", type=_probability, default=0.01, metavar="E",
                        help="without --rank: the largest relative error (Frobenius) allowed for any expert")
    export.add_argument("--skip-non-expert", action="store_true",
                        help="leave out shared experts, routers, non-expert modules and bias deltas with a warning "
                        "(default: refuse, since LoRA serving cannot hold them)")
    export.add_argument("--layout", choices=("parameters", "per-expert"), default="parameters",
                        help="fused experts as peft target_parameters (peft, vLLM's 3-D MoE LoRA) or per-expert "
                        "gate_proj/up_proj/down_proj target_modules (per-expert MoE LoRA, docs/serving.md)")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code")
    _add_out(export, "DIR", "LoRA adapter directory to write (atomically)")
    export.set_defaults(func=cmd_export_lora)

    demo = add_command("demo", help="run the offline end-to-end demo on a small synthetic MoE",
                               description="Pre-train a small DeepSeek-V2-style MoE on synthetic tasks, then score, "
                               "select, train ESFT, evaluate, save, reload and merge (1-2 minutes on a CPU).")
    demo.add_argument("--out", required=True, metavar="DIR",
                      help="directory for the demo's outputs: new, empty, or an earlier demo run's (its outputs are "
                      "replaced); a directory with other files is refused")
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (under a minute; less accurate)")
    demo.add_argument("--seed", type=int, default=1,
                      help="random seed (results vary by seed, see docs/paper_in_miniature.md)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _finish_select_defaults(args: argparse.Namespace) -> None:
    if args.command == "select" and args.top_p is None and args.top_k is None and args.budget is None:
        args.top_p = PAPER_TOP_P[args.score_function]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``esft-peft`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _finish_select_defaults(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with contextlib.nullcontext() if args.verbose else quiet_libraries(progress_bars=True):
            args.func(args)
    except KeyboardInterrupt:
        print("esft-peft: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for users; --debug for the traceback
        if args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"esft-peft {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
