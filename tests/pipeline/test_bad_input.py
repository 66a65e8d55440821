"""Every bad input a user can give ``raypeft run``, through the real CLI (``main(argv)`` in-process).

Each case must give exit code 2 and ONE line on stderr (``raypeft: error: <field>: <problem>``),
before Ray starts (``launcher.init_ray`` / ``launcher.fit`` are booby-trapped) and with nothing
written: no output folder, no MLflow store for problems found before the tracking store is
needed, and no MLflow run in the store for those found after (``models:/`` lookups). The NaN
loss case needs a real stage, so it starts Ray and is marked slow.

The README's "Troubleshooting" section lists the same cases.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from raypeft.pipeline import launcher
from raypeft.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]                  # after the config path; {case}, {data}, {port} are filled in
    expect: str                      # regex the stderr line must match (after "raypeft: error: ")
    config: str = QUICKSTART
    command: str = "run"
    rc: int = 2
    store: str = "none"              # "none": no store may appear; "shared": the fixture's store, no runs in it
    extra: dict = field(default_factory=dict)


def S(*pairs: str) -> list[str]:
    """``--set`` arguments."""
    out: list[str] = []
    for p in pairs:
        out += ["--set", p]
    return out


CASES = [
    # --- the YAML file itself
    Case("yaml-syntax", [], r".*/bad_syntax\.yaml: YAML syntax error at line 4, column 4: expected .,. or .\]., "
         r"but got .:.", config="{data}/bad_syntax.yaml"),
    Case("yaml-tab", [], r".*/tab\.yaml: YAML syntax error at line 2, column 1: found character '\\t' that cannot "
         r"start any token", config="{data}/tab.yaml"),
    Case("yaml-duplicate-key", [], r".*/dup\.yaml: YAML syntax error at line 4, column 1: duplicate key 'sft' "
         r"\(first at line 2\)", config="{data}/dup.yaml"),
    Case("config-missing", [], r".*/absent\.yaml: config file not found", config="{data}/absent.yaml"),
    Case("config-not-mapping", [], r".*/list\.yaml: expected a mapping at the top level, got list",
         config="{data}/list.yaml"),
    # --- unknown keys, types, ranges
    Case("unknown-top-key", S("scalling.num_workers=2"), r"scalling: unknown key; did you mean 'scaling'\?"),
    Case("unknown-nested-key", S("sft.learnig_rate=0.1"),
         r"sft\.learnig_rate: unknown key; did you mean 'learning_rate'\?"),
    Case("wrong-type-int", S("adapter.r=eight"), r"adapter\.r: input should be a valid integer.*got 'eight'"),
    Case("wrong-type-bool", S("tracking.register=maybe"), r"tracking\.register: input should be a valid boolean"),
    Case("wrong-type-section", S("sft=3"), r"sft: input should be a valid dictionary"),
    Case("r-zero", S("adapter.r=0"), r"adapter\.r: input should be greater than 0, got 0"),
    Case("r-negative", S("adapter.r=-4"), r"adapter\.r: input should be greater than 0, got -4"),
    Case("dropout-one", S("adapter.lora_dropout=1.0"), r"adapter\.lora_dropout: input should be less than 1"),
    Case("dropout-negative", S("adapter.lora_dropout=-0.1"),
         r"adapter\.lora_dropout: input should be greater than or equal to 0"),
    Case("lr-zero", S("sft.learning_rate=0"), r"sft\.learning_rate: input should be greater than 0, got 0"),
    Case("lr-negative-reward", S("reward.learning_rate=-1e-3"),
         r"reward\.learning_rate: input should be greater than 0"),
    Case("workers-zero", S("scaling.num_workers=0"), r"scaling\.num_workers: input should be greater than 0"),
    Case("max-length-small", S("data.max_length=4"), r"data\.max_length: input should be greater than 8"),
    Case("eval-fraction", S("data.eval_fraction=1.5"), r"data\.eval_fraction: input should be less than 1"),
    Case("template", S("data.prompt_template=no placeholder"), r"data\.prompt_template: must contain '\{prompt\}'"),
    # --- adapter methods
    Case("method-other-fields", S("adapter.method=prompt"),
         r"adapter\.\w+: unknown key; it is not a field of method 'prompt' \(fields: .*num_virtual_tokens"),
    Case("method-unknown", S("adapter.method=lorax"), r"adapter\.method: unknown method 'lorax'; expected one of lora"),
    Case("targets-match-nothing", S("adapter.target_modules=[nope_proj]"),
         r"adapter\.target_modules: no module matches 'nope_proj'; available: .*q_proj.*v_proj"),
    # --- command line and stage wiring
    Case("set-without-value", ["--set", "adapter.r"], r"--set adapter\.r: expected dotted\.key=value"),
    Case("stage-not-in-config", ["--stage", "dpo"], r"--stage dpo: not a stage of this config \(stages: sft\)"),
    Case("stage-unknown", S("stages=[train]"), r"stages\.0: input should be 'sft', 'reward', 'dpo', 'ppo' or 'grpo'"),
    Case("input-from-later-stage", S("stages=[reward,sft]"),
         r"reward\.init_from: 'sft' runs after reward in this workflow"),
    Case("ppo-no-room", S("stages=[sft,reward,ppo]", "ppo.generation.max_new_tokens=250"),
         r"ppo\.generation\.max_new_tokens: 250 leaves no room for a prompt within data\.max_length=256"),
    Case("model-missing", S("model.name_or_path={case}/no-such-model"),
         r"model\.name_or_path: folder .*no-such-model not found \(give a local model folder, a hub id, or 'demo'\)"),
    # --- data
    Case("data-missing", S("data.source={case}/absent.jsonl"), r"data\.source: file not found: .*absent\.jsonl"),
    Case("data-empty", S("data.source={data}/empty.jsonl"), r"data\.source: .*empty\.jsonl has no rows"),
    Case("data-blank", S("data.source={data}/blank.jsonl"), r"data\.source: .*blank\.jsonl has no rows"),
    Case("data-empty-dir", S("data.source={data}/emptydir"),
         r"data\.source: no \.json, \.jsonl, \.parquet or \.csv files"),
    Case("columns-missing", S("data.source={data}/qa.jsonl"),
         r"data\.columns\.prompt: column 'dialogue' not found in data\.source \(.*qa\.jsonl\); present: q, a"),
    Case("pair-columns-missing", S("stages=[reward]", "reward.init_from=null", "reward.data.source={data}/qa.jsonl"),
         r"reward\.data\.columns\.prompt: column 'prompt' not found in .*qa\.jsonl; present: q, a"),
    Case("rows-too-long-error", S("data.source={data}/long.jsonl", "data.truncation=error"),
         r"data\.max_length: row \d+ has \d+ tokens \(prompt \d+, response \d+\), more than max_length=256; "
         r"set data\.truncation: left-prompt"),
    Case("rows-too-long-warn", S("data.source={data}/long.jsonl"),
         r"^raypeft: warning: data\.max_length: 38 of 38 rows of data\.source are longer than 256 tokens; "
         r"their prompts are cut from the left \(data", command="validate", rc=0),
    Case("response-too-long-warn", S("data.source={data}/long_response.jsonl"),
         r"^raypeft: warning: data\.max_length: 38 of 38 rows of data\.source are longer than 256 tokens; their "
         r"prompts are cut from the left, and in 38 of them the response itself is longer than the room left and "
         r"is cut at its end", command="validate", rc=0),
    # --- conversations (data.format: chat)
    Case("chat-no-role", S("data.format=chat", "data.source={data}/chat_no_role.jsonl"),
         r"data\.columns\.messages: row 2 message 1 has no 'role'$"),
    Case("chat-no-content", S("data.format=chat", "data.source={data}/chat_no_content.jsonl"),
         r"data\.columns\.messages: row 2 message 0 has no 'content'$"),
    Case("chat-unknown-role", S("data.format=chat", "data.source={data}/chat_unknown_role.jsonl"),
         r"data\.columns\.messages: row 2 message 1 has unknown role 'bot'; expected one of system, user, assistant"),
    Case("chat-empty", S("data.format=chat", "data.source={data}/chat_empty.jsonl"),
         r"data\.columns\.messages: row 2 is an empty conversation$"),
    Case("chat-no-assistant", S("data.format=chat", "data.source={data}/chat_no_assistant.jsonl"),
         r"data\.columns\.messages: row 2 has no assistant turn to learn from$"),
    Case("chat-template-fails", S("data.format=chat", "data.source={data}/chat_ok.jsonl",
                                  "data.chat_template={data}/raises.jinja"),
         r"data\.chat_template: cannot render data\.columns\.messages row 0: TemplateError: no system turns here"),
    Case("chat-template-no-generation-prompt", S("data.format=chat", "data.source={data}/chat_ok.jsonl",
                                                 "data.chat_template={data}/no_generation_prompt.jinja"),
         r"data\.chat_template: the template has no generation prompt for an assistant turn \(data\.columns\.messages "
         r"row 0: '<\|im_start\|>assistant' comes after"),
    Case("chat-template-file-missing", S("data.format=chat", "data.chat_template={case}/absent.jinja"),
         r"data\.chat_template: file not found: .*absent\.jinja"),
    Case("chat-tokenizer-without-template", S("data.format=chat", "model.tokenizer={data}/tokenizer_no_template"),
         r"data\.chat_template: the tokenizer \(.*tokenizer_no_template\) has no chat template; give one in the YAML"),
    Case("chat-ppo-prompt-text", S("data.format=chat", "stages=[sft,reward,ppo]", "ppo.data.source={data}/qa.jsonl",
                                   "ppo.data.column=q", "ppo.eval_prompts=4"),
         r"ppo\.data\.column: row 0 is str, not a list of messages$"),
    # --- input adapters
    Case("adapter-no-config", S("adapter.init_from={data}/no_config"),
         r"adapter\.init_from: .*no_config: not an adapter folder \(no adapter_config\.json\)"),
    Case("adapter-missing-folder", S("adapter.init_from={case}/nowhere"),
         r"adapter\.init_from: .*nowhere: not an adapter folder \(it does not exist"),
    Case("adapter-other-base", S("stages=[sft,reward]", "reward.init_from={data}/other_base"),
         r"reward\.init_from: .*other_base does not fit model\.name_or_path: adapter for a different base\? "
         r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight: saved \(4, 64\) vs model \(4, 128\)"),
    Case("adapter-pickle-refused", S("adapter.init_from={data}/pickled"),
         r"adapter\.init_from: .*pickled/adapter_model\.bin is a pickle, and loading a pickle can run code; .*"
         r"model\.allow_pickle_adapters: true"),
    # --- tracking
    Case("mlflow-unreachable", S("tracking.uri=http://127.0.0.1:{port}"),
         r"tracking\.uri: cannot reach MLflow at http://127\.0\.0\.1:\d+ \(connection refused\)",
         extra={"max_seconds": 20}),
    Case("sqlite-folder-missing", S("tracking.uri=sqlite:///{case}/no/such/dir/m.db"),
         r"tracking\.uri: folder .*no/such/dir of the SQLite store .* does not exist"),
    Case("registry-name-missing", S("adapter.init_from=models:/no-such-adapter/1", "tracking.uri={store}"),
         r"adapter\.init_from: models:/no-such-adapter/1: cannot resolve \(.*no-such-adapter.*\)", store="shared"),
    Case("registry-alias-missing", S("adapter.init_from=models:/known-adapter@champion", "tracking.uri={store}"),
         r"adapter\.init_from: models:/known-adapter@champion: cannot resolve \(.*champion.*\)", store="shared"),

    # === issue 19, class 1: inputs that used to pass validate and fail inside Ray
    Case("sft-batch-larger-than-share", S("sft.batch_size=100000"),
         r"sft\.batch_size: 100000 per worker x 2 workers needs 200000 training rows for one batch; data\.source "
         r"\(after the held-out rows\) gives \d+"),
    Case("sft-two-rows-two-workers", S("data.source={data}/two_rows.jsonl", "sft.batch_size=1",
                                       "eval.rouge=false"),
         r"sft\.batch_size: 1 per worker x 2 workers needs 2 training rows for one batch; .* gives 1"),
    Case("sft-grad-accum-too-large", S("sft.grad_accum=100000"),
         r"sft\.batch_size: 16 per worker x 2 workers needs \d+ training rows for 100000 batches "
         r"\(sft\.grad_accum=100000\)"),
    Case("reward-batch-larger-than-share", S("stages=[reward]", "reward.init_from=null", "reward.batch_size=100000"),
         r"reward\.batch_size: 100000 per worker x 2 workers needs 200000 .*reward\.data\.source"),
    Case("dpo-batch-larger-than-share", S("stages=[dpo]", "dpo.policy_init=null", "dpo.batch_size=100000",
                                          "eval.rouge=false"),
         r"dpo\.batch_size: 100000 per worker x 2 workers needs 200000"),
    Case("ppo-eval-prompts-all", S("stages=[sft,reward,ppo]", "ppo.eval_prompts=100000"),
         r"ppo\.eval_prompts: 100000 held-out prompts leave none of the \d+ prompt rows of ppo\.data\.source"),
    Case("ppo-rollout-larger-than-share", S("stages=[sft,reward,ppo]", "ppo.rollout_batch_size=100000",
                                            "ppo.minibatches=1"),
         r"ppo\.rollout_batch_size: 100000 per worker x 2 workers needs 200000 training rows"),
    Case("seed-beyond-64-bits", S("seed=18446744073709551616"), r"seed: input should be less than 4294967296"),
    Case("seed-negative", S("seed=-1"), r"seed: input should be greater than or equal to 0, got -1"),
    Case("epochs-inf", S("sft.epochs=.inf"), r"sft\.epochs: input should be a finite number, got inf"),
    Case("learning-rate-nan", S("sft.learning_rate=.nan"), r"sft\.learning_rate: input should be a finite number"),
    Case("resources-negative", S("scaling.resources_per_worker={CPU: -1}"),
         r"scaling\.resources_per_worker: amounts must be 0 or more \(CPU: -1\)"),
    Case("registered-name-slash", S("tracking.registered_model_name=team/adapter"),
         r"tracking\.registered_model_name: may not contain '/' \(MLflow refuses"),
    Case("registered-name-colon", S("tracking.registered_model_name=a:b"),
         r"tracking\.registered_model_name: may not contain ':'"),
    Case("registered-name-blank", S("tracking.registered_model_name=' '"),
         r"tracking\.registered_model_name: must not be blank"),

    # === issue 19, class 2: input errors that used to be "stage failed" (exit 1) or a traceback
    Case("config-latin1", [], r".*/latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset \d+, line 2\); save it as UTF-8",
         config="{data}/latin1.yaml"),
    Case("config-utf16", [], r".*/utf16\.yaml: UTF-16 text \(it starts with a UTF-16 byte-order mark\)",
         config="{data}/utf16.yaml"),
    Case("config-stray-byte", [], r".*/stray\.yaml: not UTF-8 text \(byte 0xff at offset \d+, line 3\)",
         config="{data}/stray.yaml"),
    Case("data-latin1", S("data.source={data}/latin1.jsonl"),
         r"data\.source: .*/latin1\.jsonl is not UTF-8 text \(byte 0xe9 at offset \d+, line 1\)"),
    Case("data-utf16", S("data.source={data}/utf16.jsonl"), r"data\.source: .*/utf16\.jsonl is UTF-16 text"),
    Case("data-csv-stray-byte", S("data.source={data}/stray.csv"),
         r"data\.source: .*/stray\.csv is not UTF-8 text \(byte 0xff"),
    Case("yaml-nested-thousands-deep", [], r".*/deep\.yaml: YAML syntax error at line 2, .*: nested more than 64 "
         r"levels deep", config="{data}/deep.yaml"),
    Case("r-too-large-to-allocate", S("adapter.r=100000000"),
         r"adapter\.r: 100000000 gives .* trainable parameters, .* GB with their gradients and Adam state, more "
         r"than this machine's .* GB of memory"),
    Case("adapter-zero-bytes", S("adapter.init_from={data}/zero_bytes"),
         r"adapter\.init_from: .*zero_bytes/adapter_model\.safetensors is empty \(0 bytes\)"),
    Case("adapter-truncated", S("adapter.init_from={data}/truncated"),
         r"adapter\.init_from: .*truncated/adapter_model\.safetensors is not a readable safetensors file"),
    Case("adapter-nan-weights", S("adapter.init_from={data}/nan_weights"),
         r"adapter\.init_from: .*nan_weights/adapter_model\.safetensors: tensor .* has \d+ NaN or infinite values"),
    Case("adapter-int-weights", S("adapter.init_from={data}/int_weights"),
         r"adapter\.init_from: .*int_weights/adapter_model\.safetensors: tensor .* is int64, expected a "
         r"floating-point dtype"),
    Case("output-dir-is-a-file", S("output_dir={data}/a_file", "name=x"),
         r"output_dir: .*/a_file lies under .*/a_file, which is a file|output_dir: .*a_file.* is a file"),
    Case("output-dir-under-a-file", S("output_dir={data}/a_file/sub"),
         r"output_dir: .*/a_file/sub/\S+ lies under .*/a_file, which is a file, not a folder"),
    Case("output-dir-read-only", S("output_dir=/proc/raypeft-out"),
         r"output_dir: cannot write in /proc \(read-only, or permission denied\)"),
    Case("tracking-unsupported-scheme", S("tracking.uri=ftp://example.org/mlflow"),
         r"tracking\.uri: unsupported scheme 'ftp' in ftp://example\.org/mlflow; expected one of sqlite, http"),
    Case("tracking-not-a-uri", S("tracking.uri=just some words"),
         r"tracking\.uri: 'just some words' is not a URI; expected sqlite:////abs/path/mlflow\.db"),
    Case("experiment-empty", S("tracking.experiment=''"), r"tracking\.experiment: must not be blank"),
    Case("sqlite-read-only-folder", S("tracking.uri=sqlite:////proc/m.db"),
         r"tracking\.uri: the store sqlite:////proc/m\.db is not writable: cannot write in /proc", 
         extra={"max_seconds": 20}),

    # === issue 19, class 3: inputs that used to hang
    Case("yaml-alias-bomb", [], r".*/bomb\.yaml: YAML syntax error at line 1, column 1: its aliases expand to more "
         r"than 100,000 values \(an alias bomb\?\)", config="{data}/bomb.yaml", extra={"max_seconds": 10}),
    Case("set-alias-bomb", ["--set", "sft.epochs=" + "&a [1,1,1,1,1,1,1,1,1,1]"],
         r"sft\.epochs: input should be a valid number, got \[1, 1, 1, 1, 1, 1, \.\.\.\]", extra={"max_seconds": 10}),
    Case("more-workers-than-cpus", S("scaling.num_workers=100000"),
         r"scaling\.num_workers: 100000 workers x 1 CPU each need 100000 CPUs; this machine has \d+ \(a local "
         r"Ray would wait for them forever\)"),
    Case("cpus-per-worker-too-many", S("scaling.resources_per_worker={CPU: 100000}"),
         r"scaling\.num_workers: 2 workers x 100000 CPU each need 200000 CPUs"),
    Case("custom-resource-local", S("scaling.resources_per_worker={CPU: 1, TPU: 1}"),
         r"scaling\.resources_per_worker\.TPU: a custom resource, which a local Ray does not have"),
    Case("ray-address-dead", [], r"RAY_ADDRESS: cannot reach the Ray cluster at 127\.0\.0\.1:\d+ "
         r"\(connection refused\)", extra={"env": {"RAY_ADDRESS": "127.0.0.1:{port}"}, "max_seconds": 20}),
]
if not torch.cuda.is_available():
    CASES.append(Case("use-gpu-without-gpu", S("scaling.use_gpu=true"),
                      r"scaling\.num_workers: 2 workers x 1 GPU each need 2 GPUs; this machine has 0 .*use_gpu: false"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora_adapter(base: torch.nn.Module, folder: Path, r: int = 4) -> None:
    from raypeft.adapters import LoraConfig, get_adapter_model

    get_adapter_model(base, LoraConfig(r=r, target_modules=["q_proj", "v_proj"])).save_pretrained(str(folder))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bad files, odd adapters and a registry store with one model (no runs) shared by all cases."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypeft.pipeline.config import ModelSpec
    from raypeft.pipeline.modeling import load_base_model

    d = tmp_path_factory.mktemp("bad-input")
    (d / "bad_syntax.yaml").write_text("name: x\nadapter:\n  r: [1, 2\nsft: {}\n")
    (d / "tab.yaml").write_text("name: x\n\tsft: 1\n")
    (d / "dup.yaml").write_text("name: x\nsft:\n  epochs: 1\nsft:\n  epochs: 2\n")
    (d / "list.yaml").write_text("- sft\n- reward\n")
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n  \n")
    (d / "emptydir").mkdir()
    (d / "qa.jsonl").write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(40)))
    (d / "long.jsonl").write_text("\n".join(json.dumps({"dialogue": "word " * 400, "summary": f"short {i}"})
                                            for i in range(40)))
    (d / "long_response.jsonl").write_text("\n".join(json.dumps({"dialogue": f"short {i}", "summary": "word " * 400})
                                                     for i in range(40)))
    ok = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello."}]
    bad_rows = {"no_role": [{"role": "user", "content": "Hi"}, {"content": "Hello."}],
                "no_content": [{"role": "user"}, {"role": "assistant", "content": "Hello."}],
                "unknown_role": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}],
                "empty": [], "no_assistant": [{"role": "user", "content": "Hi"}]}
    (d / "chat_ok.jsonl").write_text("\n".join(json.dumps({"messages": ok}) for _ in range(40)))
    for name, bad in bad_rows.items():  # row 2 is the bad one
        rows = [ok, ok, bad] + [ok] * 37
        (d / f"chat_{name}.jsonl").write_text("\n".join(json.dumps({"messages": r}) for r in rows))
    (d / "raises.jinja").write_text("{% if messages[0]['role'] == 'system' %}"
                                    "{{ raise_exception('no system turns here') }}{% endif %}")
    (d / "no_generation_prompt.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    from transformers import AutoTokenizer

    from raypeft.pipeline.demo import ensure_demo_assets

    plain = AutoTokenizer.from_pretrained(str(ensure_demo_assets().model_dir))
    plain.chat_template = None
    plain.save_pretrained(str(d / "tokenizer_no_template"))
    (d / "no_config").mkdir()
    (d / "no_config" / "adapter_model.safetensors").write_bytes(b"")

    # An adapter trained on a narrower Llama (hidden 64 vs the demo's 128).
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=1033, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    _lora_adapter(other, d / "other_base")

    # An adapter for the demo base whose weights are a pickle (adapter_model.bin) only.
    _lora_adapter(load_base_model(ModelSpec()), d / "pickled")
    weights = load_file(str(d / "pickled" / "adapter_model.safetensors"))
    torch.save(weights, d / "pickled" / "adapter_model.bin")
    (d / "pickled" / "adapter_model.safetensors").unlink()

    # Text that is not UTF-8, YAML that nests or expands without bound (issue 19).
    (d / "latin1.yaml").write_bytes("name: x\nsft: {epochs: 1}  # café\n".encode("latin-1"))
    (d / "utf16.yaml").write_bytes("name: x\n".encode("utf-16"))
    (d / "stray.yaml").write_bytes(b"name: x\nsft:\n  epochs: 1 \xff\n")
    rows = [json.dumps({"dialogue": f"dialogue {i}", "summary": f"résumé {i}"}, ensure_ascii=False) for i in range(40)]
    (d / "latin1.jsonl").write_bytes("\n".join(rows).encode("latin-1"))
    (d / "utf16.jsonl").write_bytes("\n".join(rows).encode("utf-16"))
    (d / "stray.csv").write_bytes(b"dialogue,summary\nhello,world\nhi \xff,there\n")
    (d / "two_rows.jsonl").write_text("\n".join(json.dumps({"dialogue": f"d {i}", "summary": f"s {i}"})
                                                for i in range(2)))
    (d / "deep.yaml").write_text("name: x\nsft: " + "[" * 5000 + "]" * 5000 + "\n")
    levels = ["a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (d / "bomb.yaml").write_text("\n".join(levels) + "\n")
    (d / "a_file").write_text("not a folder")

    # Adapters for the demo base whose safetensors file is empty, cut short, NaN or integer.
    _lora_adapter(load_base_model(ModelSpec()), d / "good")
    good = load_file(str(d / "good" / "adapter_model.safetensors"))
    for name in ("zero_bytes", "truncated", "nan_weights", "int_weights"):
        shutil.copytree(d / "good", d / name)
    (d / "zero_bytes" / "adapter_model.safetensors").write_bytes(b"")
    blob = (d / "good" / "adapter_model.safetensors").read_bytes()
    (d / "truncated" / "adapter_model.safetensors").write_bytes(blob[:len(blob) // 2])
    first = sorted(good)[0]
    save_file({**good, first: torch.full_like(good[first], float("nan"))},
              str(d / "nan_weights" / "adapter_model.safetensors"))
    save_file({**good, first: good[first].to(torch.int64)}, str(d / "int_weights" / "adapter_model.safetensors"))

    store = f"sqlite:///{d / 'registry.db'}"
    client = MlflowClient(store)
    client.create_registered_model("known-adapter")
    return d


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if anything tries to start Ray or a trainer."""
    started: list[str] = []

    def trap(name: str):
        def _trap(*args, **kwargs):
            started.append(name)
            raise AssertionError(f"{name} was called: bad input must fail before Ray starts")
        return _trap

    monkeypatch.setattr(launcher, "init_ray", trap("init_ray"))
    monkeypatch.setattr(launcher, "fit", trap("fit"))
    return started


def _fill(text: str, **values: str) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def test_the_table_has_thirty_cases_or_more() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case: Case, data_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                      no_ray: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = f"sqlite:///{data_dir / 'registry.db'}"
    values = {"case": str(tmp_path), "data": str(data_dir), "port": str(_free_port()), "store": store}
    for key, value in case.extra.get("env", {}).items():
        monkeypatch.setenv(key, _fill(value, **values))
    own_store = tmp_path / "m.db"
    argv = [case.command, _fill(case.config, **values),
            "--set", "stages=[sft]", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"tracking.uri=sqlite:///{own_store}",
            *[_fill(a, **values) for a in case.args]]
    if case.command == "validate":
        argv = [a for a in argv if not a.startswith("--stage")]
    started = time.monotonic()
    rc = main(argv)
    elapsed = time.monotonic() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    assert rc == case.rc, err
    assert not no_ray
    if case.rc == 2:
        assert len(err) == 1, err  # one line, nothing else on stderr
        assert err[0].startswith("raypeft: error: "), err
        assert re.match(case.expect, err[0][len("raypeft: error: "):]), err[0]
    else:
        assert any(re.match(case.expect, line) for line in err), err
    assert elapsed < case.extra.get("max_seconds", 120), elapsed
    # Nothing written: no output folder, no checkpoint, no MLflow store or run.
    assert not (tmp_path / "out").exists()
    assert not own_store.exists()
    assert not (tmp_path / "mlartifacts").exists()
    if case.store == "shared":
        from mlflow import MlflowClient

        client = MlflowClient(store)
        experiments = client.search_experiments()
        assert not client.search_runs([e.experiment_id for e in experiments]), "a run was created"


@pytest.mark.slow
def test_nan_loss_stops_the_stage_with_its_step_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A huge learning rate makes the step-2 loss NaN: the stage stops there (no retry even with
    ``failure.max_failures``), the step-1 checkpoint is kept, nothing is published or registered,
    both MLflow runs end FAILED and the CLI exits 1 with the step in its one line."""
    import ray
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["run", QUICKSTART, *S("stages=[sft]", "data.max_train_rows=64", "sft.max_steps=6", "sft.batch_size=8",
                                  "sft.learning_rate=1e30", "sft.warmup_steps=0", "sft.max_grad_norm=null",
                                  "sft.log_every=1", "sft.checkpoint_every=1", "eval.rouge=false",
                                  "scaling.num_workers=1", "failure.max_failures=2", f"tracking.uri={uri}",
                                  f"output_dir={tmp_path / 'out'}", "name=nan")]
    try:
        rc = main(argv)
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1, err
    line = err[-1]
    m = re.match(r"raypeft: stage failed: NonFiniteLoss: sft: loss is (nan|inf) at step (\d+); the stage stopped "
                 r"before applying that update; last good checkpoint \(step (\d+)\): (\S+)", line)
    assert m, line
    bad_step, good_step, ckpt = int(m.group(2)), int(m.group(3)), Path(m.group(4))
    assert good_step == bad_step - 1 >= 1
    assert json.loads((ckpt / "checkpoint.json").read_text()) == {"step": good_step, "complete": True}
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "nan" / "sft" / "adapter").exists()  # nothing published

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2  # parent + stage, no retry runs
    stage = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    steps = [m.step for m in client.get_metric_history(stage.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, bad_step)), steps  # every good step logged once, the bad one not
    assert not client.search_registered_models()
