"""CI checks of manifests/, all offline: yamllint, `kubectl kustomize` of every overlay, `kubernetes-validate --strict`
of the rendered core objects (and of each predictor rendered as a Pod), every InferenceService against KServe's strict
schema, the project's own rules, and checkov. Each check also runs on a deliberately broken fixture
(tests/fixtures/deploy/) to show it can fail.

The tools live in .tools-venv/ (scripts/setup-tools.sh). Missing tools fail the tests when CI is set, else skip them.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools-venv" / "bin"
FIXTURES = ROOT / "tests" / "fixtures" / "deploy"
OVERLAYS_DIR = ROOT / "manifests" / "overlays"
# KServe's CRD schema, made strict; its source, version and how to regenerate it: tests/fixtures/kserve/README.md.
SCHEMA = ROOT / "tests" / "fixtures" / "kserve" / "inferenceservice_v1beta1-strict.json"
EXPECTED_OVERLAYS = {"bloom-176b-fast", "bloom-176b-fp16", "bloom-176b-int8", "bloom-7b1", "dev-cpu", "standard-keda"}
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())

# checkov checks not applied, and why:
CHECKOV_SKIPS = {
    # Images are referenced by immutable version tags; pin digests at deploy time (`kustomize edit set image`,
    # docs/deploy.md): the digest is only known once the release is pushed.
    "CKV_K8S_43": "image digest",
    # A NetworkPolicy depends on the cluster's ingress (Knative activator / gateway namespaces): docs/deploy.md.
    "CKV2_K8S_6": "NetworkPolicy",
}

# InferenceService predictor fields that are KServe's, not the Pod's (removed when rendering the predictor as a Pod).
KSERVE_ONLY_FIELDS = {
    "minReplicas",
    "maxReplicas",
    "scaleMetric",
    "scaleMetricType",
    "scaleTarget",
    "containerConcurrency",
    "timeout",
    "autoScaling",
    "canaryTrafficPercent",
    "batcher",
    "logger",
    "annotations",
    "labels",
    "deploymentStrategy",
    "workerSpec",
    "storageUris",
    "model",
    "serviceAccount",
}
KNATIVE = {"Knative", "Serverless"}
STANDARD = {"Standard", "RawDeployment"}


# ------------------------------------------------------------------------------------------------------------ tools


def tool(name: str) -> str:
    """Path of a checker installed by scripts/setup-tools.sh: fail (CI) or skip (elsewhere) when it is missing."""
    exe = TOOLS / name
    if exe.exists():
        return str(exe)
    msg = f"{exe} is missing: run scripts/setup-tools.sh (installs the pinned offline checkers into .tools-venv/)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def run_tool(argv: list[str], timeout: int = 180, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)


def output(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n{p.stdout}\n{p.stderr}".strip()


def kustomize(path: pathlib.Path) -> subprocess.CompletedProcess:
    return run_tool([tool("kubectl"), "kustomize", str(path)], timeout=60)


_rendered: dict[str, list[dict]] = {}


def rendered(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        p = kustomize(OVERLAYS_DIR / overlay)
        assert p.returncode == 0, output(p)
        _rendered[overlay] = [d for d in yaml.safe_load_all(p.stdout) if d]
    return _rendered[overlay]


def rendered_broken() -> list[dict]:
    p = kustomize(FIXTURES / "broken")
    assert p.returncode == 0, output(p)
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def predictor_pod(isvc: dict) -> dict:
    """The InferenceService's predictor as the Pod KServe would create (for core schema and checkov checks)."""
    spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in KSERVE_ONLY_FIELDS}
    name = isvc["metadata"]["name"] + "-predictor"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "bloom"}, "spec": spec}


# ------------------------------------------------------------------------------------------------------ the checks


def test_the_issue_overlays_exist():
    assert EXPECTED_OVERLAYS <= set(OVERLAYS), sorted(EXPECTED_OVERLAYS - set(OVERLAYS))


def test_yamllint_strict():
    p = run_tool([tool("yamllint"), "--strict", "-c", str(FIXTURES / "yamllint.yaml"), "manifests"])
    assert p.returncode == 0, output(p)


def test_yamllint_catches_a_duplicate_key():
    p = run_tool(
        [tool("yamllint"), "--strict", "-c", str(FIXTURES / "yamllint.yaml"), str(FIXTURES / "duplicate-key.yaml")]
    )
    assert p.returncode != 0 and 'duplication of key "minReplicas"' in p.stdout, output(p)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders(overlay):
    p = kustomize(OVERLAYS_DIR / overlay)
    assert p.returncode == 0, output(p)
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(p.stdout) if d)
    assert kinds == ["InferenceService", "Job", "PersistentVolumeClaim"], kinds


def test_kustomize_fails_on_a_broken_kustomization():
    p = kustomize(FIXTURES / "broken-kustomize")
    assert p.returncode != 0 and "no-such-file.yaml" in p.stderr, output(p)


def _kubernetes_validate(docs: list[dict], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    core = [d for d in docs if d["kind"] != "InferenceService"]
    core += [predictor_pod(d) for d in docs if d["kind"] == "InferenceService"]
    f = tmp_path / "core.yaml"
    f.write_text(yaml.safe_dump_all(core, sort_keys=False))
    return run_tool([tool("kubernetes-validate"), "--strict", "-k", "1.30", "-k", "1.37", str(f)])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_strict(overlay, tmp_path):
    p = _kubernetes_validate(rendered(overlay), tmp_path)
    assert p.returncode == 0, output(p)
    assert "passed for resource pod/" in p.stdout and "passed for resource job/" in p.stdout, output(p)


def test_kubernetes_validate_catches_an_unknown_field(tmp_path):
    p = _kubernetes_validate(rendered_broken(), tmp_path)
    assert p.returncode != 0 and "backofLimit" in p.stdout + p.stderr, output(p)


_SCHEMA_CHECK = r"""
import json, sys, jsonschema, yaml
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
bad = 0
for doc in yaml.safe_load_all(open(sys.argv[2])):
    if not doc or doc.get("kind") != "InferenceService":
        continue
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        bad += 1
        print(f"{doc['metadata'].get('name')}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
sys.exit(1 if bad else 0)
"""


def _schema_check(docs: list[dict], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    if not SCHEMA.is_file():
        pytest.fail(f"{SCHEMA} is missing (scripts/kserve_schema.py writes it)")
    f = tmp_path / "isvc.yaml"
    f.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] == "InferenceService"]))
    return run_tool([tool("python"), "-c", _SCHEMA_CHECK, str(SCHEMA), str(f)])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inferenceservice_matches_kserve_strict_schema(overlay, tmp_path):
    p = _schema_check(rendered(overlay), tmp_path)
    assert p.returncode == 0, output(p)


def test_kserve_schema_catches_a_typo(tmp_path):
    p = _schema_check(rendered_broken(), tmp_path)
    assert p.returncode != 0 and "'minReplica' was unexpected" in p.stdout, output(p)


# ------------------------------------------------------------------------------------------------- project rules


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", []) if "name" in e}


def _gpus(container: dict) -> tuple[int, int]:
    res = container.get("resources", {})
    return (
        int(res.get("limits", {}).get("nvidia.com/gpu", 0)),
        int(res.get("requests", {}).get("nvidia.com/gpu", res.get("limits", {}).get("nvidia.com/gpu", 0))),
    )


def _seconds(s: str | None) -> float:
    m = re.fullmatch(r"(\d+)(s|m|h)?", str(s or "").strip())
    if not m:
        return 0.0
    return int(m.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def project_rule_problems(docs: list[dict]) -> list[str]:
    """The rules no schema holds (KServe's webhook and cross-object facts). One line per problem."""
    problems: list[str] = []
    pvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    jobs = [d for d in docs if d["kind"] == "Job"]
    for isvc in (d for d in docs if d["kind"] == "InferenceService"):
        name = isvc["metadata"]["name"]
        ann = isvc["metadata"].get("annotations", {}) or {}
        pred = isvc["spec"]["predictor"]
        mode = ann.get("serving.kserve.io/deploymentMode")
        if mode not in KNATIVE | STANDARD:
            problems.append(f"{name}: serving.kserve.io/deploymentMode must be set explicitly (got {mode!r})")
        lo, hi = pred.get("minReplicas", 1), pred.get("maxReplicas", 0)
        if hi and lo > hi:
            problems.append(f"{name}: minReplicas {lo} > maxReplicas {hi}")
        if lo == 0 and mode not in KNATIVE:
            problems.append(f"{name}: minReplicas 0 (scale to zero) needs Knative mode, not {mode}")
        if mode in STANDARD:
            scaler = ann.get("serving.kserve.io/autoscalerClass", "hpa")
            if scaler == "keda" and ("scaleMetric" in pred or not pred.get("autoScaling")):
                problems.append(f"{name}: autoscalerClass keda takes spec.predictor.autoScaling, not scaleMetric")
        if mode in KNATIVE:
            if _seconds(ann.get("serving.knative.dev/progress-deadline")) < 600:
                problems.append(
                    f"{name}: serving.knative.dev/progress-deadline must cover a multi-minute load (>= 600s)"
                )
        containers = {c["name"]: c for c in pred.get("containers", [])}
        c = containers.get("kserve-container")
        if c is None:
            problems.append(f"{name}: no container named kserve-container")
            continue
        env = _env(c)
        ports = [p.get("containerPort") for p in c.get("ports", [])]
        if ports and ports != [8080]:
            problems.append(f"{name}: kserve-container must listen on 8080, not {ports}")
        if env.get("BLOOM_MODEL_ID") not in (None, name):
            problems.append(f"{name}: BLOOM_MODEL_ID {env.get('BLOOM_MODEL_ID')!r} is not the InferenceService name")
        # Storage: pvc://NAME/SUBPATH names a PVC defined here, and a Job writes exactly that place.
        uri = env.get("STORAGE_URI") or ""
        m = re.fullmatch(r"pvc://([^/]+)/(.+)", uri)
        if not m:
            problems.append(f"{name}: STORAGE_URI {uri!r} is not pvc://<pvc>/<subpath>")
        else:
            pvc, sub = m.group(1), m.group(2).strip("/")
            if pvc not in pvcs:
                problems.append(f"{name}: STORAGE_URI names PVC {pvc!r}, which these manifests do not define")
            elif "ReadWriteMany" not in pvcs[pvc]["spec"].get("accessModes", []):
                problems.append(f"{name}: PVC {pvc} must be ReadWriteMany (a Job writes it, every predictor reads it)")
            writers = [j for j in jobs if (pvc, sub) in _job_writes(j)]
            if not writers:
                seen = ", ".join(f"{j['metadata']['name']} -> {w}" for j in jobs for w in _job_writes(j)) or "no Job"
                problems.append(f"{name}: no Job writes pvc {pvc!r} subpath {sub!r} ({seen})")
            elif env.get("BLOOM_BACKEND") == "fast" and _gpus(c)[0]:
                problems += _preshard_problems(name, env, writers[0], (pvc, sub))
                problems += _precompile_problems(name, env, pred, writers[0], (pvc, sub))
        # GPUs: the tensor-parallel degree the container starts with is the GPU count it gets.
        limit, request = _gpus(c)
        if limit != request:
            problems.append(f"{name}: nvidia.com/gpu request {request} != limit {limit}")
        tp = int(env.get("BLOOM_NUM_GPUS") or 0)
        if tp != limit:
            problems.append(f"{name}: BLOOM_NUM_GPUS {tp} != nvidia.com/gpu limit {limit}")
        if limit:
            vols = {v["name"]: v for v in pred.get("volumes", [])}
            shm = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
            if not shm or vols.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
                problems.append(f"{name}: {limit} GPUs but no memory-backed emptyDir at /dev/shm (NCCL)")
            if env.get("BLOOM_BACKEND") not in ("ds_inference", "ds_zero", "fast"):
                problems.append(f"{name}: GPUs with BLOOM_BACKEND {env.get('BLOOM_BACKEND')!r}")
        # Probes that tolerate the load, and time to drain.
        for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
            got = (c.get(probe) or {}).get("httpGet", {}).get("path")
            if got != path:
                problems.append(f"{name}: {probe} must GET {path} (got {got!r})")
        grace = pred.get("terminationGracePeriodSeconds", 30)
        if grace <= float(env.get("BLOOM_DRAIN_TIMEOUT_S") or 30):
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= BLOOM_DRAIN_TIMEOUT_S")
    for job in jobs:
        jname = job["metadata"]["name"]
        spec = job["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            res = c.get("resources", {})
            if not res.get("limits") or res.get("requests") != res.get("limits"):
                problems.append(f"{jname}: container {c['name']} must set requests equal to limits")
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("privileged"):
                problems.append(f"{jname}: container {c['name']} needs a read-only root filesystem, unprivileged")
        if not (spec.get("securityContext", {}).get("runAsNonRoot")):
            problems.append(f"{jname}: pod must run as non-root")
        if "backoffLimit" not in job["spec"]:
            problems.append(f"{jname}: set backoffLimit (each retry resumes the download)")
    return problems


# nvidia.com/gpu.product (GPU feature discovery's label) -> the CUDA architecture `bloom-server precompile` targets.
GPU_ARCH = {"NVIDIA-A10G": 86, "NVIDIA-A100-SXM4-80GB": 80, "NVIDIA-A100-SXM4-40GB": 80, "NVIDIA-A100-80GB-PCIe": 80,
            "NVIDIA-H100-80GB-HBM3": 90, "NVIDIA-H200": 90, "NVIDIA-L4": 89}  # fmt: skip
# The settings that decide which kernel variants the fast engine compiles (fast/coldstart/precompile.py's facts).
PLAN_SETTINGS = ("BLOOM_DTYPE", "BLOOM_MAX_BATCH_SIZE", "BLOOM_NUM_GPUS", "BLOOM_MAX_TOTAL_TOKENS",
                 "BLOOM_MAX_INPUT_LENGTH", "BLOOM_MAX_NEW_TOKENS", "BLOOM_FAST_DECODE")  # fmt: skip


def _flag(containers: list[dict], flag: str) -> str | None:
    """The value after `flag` in the first of `containers` whose args carry it (trailing slash dropped)."""
    for c in containers:
        args = [str(a) for a in c.get("args", [])]
        if flag in args[:-1]:
            return args[args.index(flag) + 1].rstrip("/")
    return None


def _runs(c: dict, subcommand: str) -> bool:
    return [str(a) for a in c.get("command", []) + c.get("args", [])][:2] == ["bloom-server", subcommand]


def _on_pvc(spec: dict, c: dict, path: str | None, writable: bool = False) -> tuple[str, str] | None:
    """(pvc, subpath) that `path` names in container `c` of a pod `spec`, or None (not on a mounted PVC)."""
    if not path:
        return None
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    for m in c.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if m["name"] in claims and path.startswith(mount + "/") and not (writable and m.get("readOnly")):
            return claims[m["name"]], path[len(mount) + 1 :]
    return None


def _index(containers: list[dict], c: dict) -> int | None:
    return next((i for i, x in enumerate(containers) if x is c), None)


def _preshard_problems(name: str, env: dict, job: dict, served: tuple[str, str]) -> list[str]:
    """A fast-backend predictor on several GPUs serves a directory the Job pre-sharded (each rank then reads one file
    of its tensors) at the server's degree and dtype, from what the Job downloaded, after the download and before the
    precompile."""
    jname = job["metadata"]["name"]
    spec = job["spec"]["template"]["spec"]
    inits, steps = spec.get("initContainers", []), spec.get("initContainers", []) + spec.get("containers", [])
    tp = int(env.get("BLOOM_NUM_GPUS") or 1)
    pre = [c for c in steps if _runs(c, "preshard") and _on_pvc(spec, c, _flag([c], "--out"), True) == served]
    if not pre:
        if tp > 1:
            return [f"{name}: backend fast on {tp} GPUs serves a plain checkpoint: pre-shard it in Job {jname}"]
        return []
    c, out = pre[0], []
    if _flag([c], "--tp") != str(tp):
        out.append(f"{name}: Job {jname} pre-shards for --tp {_flag([c], '--tp')}, the server runs BLOOM_NUM_GPUS {tp}")
    dtype = _flag([c], "--dtype")
    if dtype is not None and dtype != env.get("BLOOM_DTYPE"):
        out.append(
            f"{name}: Job {jname} pre-shards to --dtype {dtype}, the server runs BLOOM_DTYPE {env.get('BLOOM_DTYPE')!r}"
        )
    source = _on_pvc(spec, c, _flag([c], "--model"))
    downloads = [d for d in steps if "--local-dir" in d.get("args", [])]
    dl = [d for d in downloads if _on_pvc(spec, d, _flag([d], "--local-dir"), True) == source]
    if not dl:
        locals_ = [_flag([d], "--local-dir") for d in downloads]
        out.append(f"{name}: Job {jname} pre-shards {_flag([c], '--model')}, which it does not download ({locals_})")
    else:
        i_dl, i_pre = _index(inits, dl[0]), _index(inits, c)
        if i_dl is None or i_pre is None or i_pre < i_dl:
            out.append(f"{name}: Job {jname} must pre-shard after the download and before the precompile "
                       "(download, then preshard, in initContainers)")  # fmt: skip
    return out


def _precompile_problems(name: str, env: dict, pred: dict, job: dict, served: tuple[str, str]) -> list[str]:
    """A fast-backend predictor on GPUs: the Job that writes its weights also compiles its decode kernels (so a first
    start on a new node skips compiling) into the directory the server reads, for the GPU the predictor is scheduled
    on and with its settings."""
    jname = job["metadata"]["name"]
    spec = job["spec"]["template"]["spec"]
    pre = [c for c in spec.get("containers", []) + spec.get("initContainers", []) if _runs(c, "precompile")]
    if not pre:
        return [f"{name}: backend fast on GPUs, but Job {jname} runs no `bloom-server precompile`"]
    c, out = pre[0], []
    args = [str(a) for a in c.get("args", [])]
    model = _flag([c], "--model")
    if _on_pvc(spec, c, model, True) != served:
        out.append(f"{name}: Job {jname} precompiles {model}, not the directory the server reads "
                   f"(pvc {served[0]!r} subpath {served[1]!r})")  # fmt: skip
    tp = _flag([c], "--tp")
    if tp is not None and tp != str(env.get("BLOOM_NUM_GPUS") or 1):
        out.append(
            f"{name}: Job {jname} precompiles for --tp {tp}, the server runs BLOOM_NUM_GPUS {env.get('BLOOM_NUM_GPUS')}"
        )
    product = (pred.get("nodeSelector") or {}).get("nvidia.com/gpu.product")
    targets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--target"]
    want = GPU_ARCH.get(product)
    from bloom_server.fast.coldstart.precompile import parse_target

    if want is None:
        out.append(f"{name}: backend fast on GPUs needs a known nvidia.com/gpu.product nodeSelector (got {product!r})")
    elif want not in [parse_target(t) for t in targets]:
        out.append(f"{name}: Job {jname} precompiles for {targets}, not {product}'s cuda:{want}")
    penv = _env(c)
    for key in PLAN_SETTINGS:
        if penv.get(key) != env.get(key):
            out.append(
                f"{name}: Job {jname} precompiles with {key}={penv.get(key)!r}, the server runs {env.get(key)!r}"
            )
    if not (spec.get("initContainers") and spec["initContainers"][-1] is not c
            and c in spec.get("containers", [])):  # fmt: skip
        out.append(f"{name}: Job {jname} must precompile after the download (download in initContainers)")
    return out


def _job_writes(job: dict) -> list[tuple[str, str]]:
    """(pvc, subpath) of each directory a Job fills: a download's --local-dir, a preshard's --out."""
    spec = job["spec"]["template"]["spec"]
    out = []
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        flag = "--out" if _runs(c, "preshard") else "--local-dir"
        where = _on_pvc(spec, c, _flag([c], flag), writable=True)
        if where is not None:
            out.append(where)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_project_rules(overlay):
    problems = project_rule_problems(rendered(overlay))
    assert not problems, "\n".join(problems)


def test_project_rules_catch_each_broken_fixture():
    problems = "\n".join(project_rule_problems(rendered_broken()))
    for expected in (
        "broken-replicas: minReplicas 3 > maxReplicas 2",
        "broken: minReplicas 0 (scale to zero) needs Knative mode, not Standard",
        "broken: STORAGE_URI names PVC 'missing-pvc', which these manifests do not define",
        "broken-replicas: PVC weights must be ReadWriteMany",
        "broken-replicas: no Job writes pvc 'weights' subpath 'model' (download -> ('weights', 'other')",
        "broken: BLOOM_NUM_GPUS 4 != nvidia.com/gpu limit 8",
        "broken: 8 GPUs but no memory-backed emptyDir at /dev/shm",
        "broken-replicas: serving.knative.dev/progress-deadline must cover a multi-minute load",
        "broken: readinessProbe must GET /ready",
        "download: container download must set requests equal to limits",
        "download: pod must run as non-root",
        "broken-kernels: Job download precompiles for ['cuda:90'], not NVIDIA-A10G's cuda:86",
        "broken-kernels: Job download precompiles with BLOOM_MAX_BATCH_SIZE='32', the server runs '16'",
        "broken-kernels: Job download must precompile after the download",
        "broken-kernels: Job download precompiles /mnt/pvc/elsewhere, not the directory the server reads",
        # the pre-sharded layout (fast backend on several GPUs)
        "broken-preshard: Job download-sharded pre-shards for --tp 4, the server runs BLOOM_NUM_GPUS 8",
        "broken-preshard: Job download-sharded pre-shards to --dtype bf16, the server runs BLOOM_DTYPE 'fp16'",
        "broken-preshard: Job download-sharded must pre-shard after the download and before the precompile",
        "broken-preshard: Job download-sharded precompiles /mnt/pvc/src, not the directory the server reads "
        "(pvc 'weights' subpath 'sharded')",
        "broken-preshard: Job download-sharded precompiles for --tp 4, the server runs BLOOM_NUM_GPUS 8",
        "broken-source: Job download-sharded pre-shards /mnt/pvc/src-other, which it does not download",
        "broken-plain: backend fast on 8 GPUs serves a plain checkpoint: pre-shard it in Job download-sharded",
    ):
        assert expected in problems, f"missing {expected!r} in:\n{problems}"


def test_overlay_specifics():
    """What each overlay must hold, beyond the generic rules."""

    def isvc(overlay):
        return next(d for d in rendered(overlay) if d["kind"] == "InferenceService")

    def gpus(overlay):
        return _gpus(isvc(overlay)["spec"]["predictor"]["containers"][0])[0]

    fp16 = isvc("bloom-176b-fp16")
    pred, ann = fp16["spec"]["predictor"], fp16["metadata"]["annotations"]
    env = _env(pred["containers"][0])
    assert ann["serving.kserve.io/deploymentMode"] == "Knative" and pred["minReplicas"] == 0
    assert pred["maxReplicas"] >= 1 and pred["scaleMetric"] == "concurrency"
    assert (
        pred["scaleTarget"] == int(env["BLOOM_MAX_BATCH_SIZE"]) and pred["containerConcurrency"] >= pred["scaleTarget"]
    )
    assert int(env["BLOOM_MAX_QUEUED_REQUESTS"]) >= pred["containerConcurrency"]
    assert (
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period" in ann and "autoscaling.knative.dev/window" in ann
    )
    assert _seconds(ann["serving.knative.dev/progress-deadline"]) >= 1200
    assert gpus("bloom-176b-fp16") == 8 and gpus("bloom-176b-int8") == 4 and gpus("bloom-7b1") == 1
    assert gpus("dev-cpu") == 0 and _env(isvc("dev-cpu")["spec"]["predictor"]["containers"][0])["BLOOM_BACKEND"] == "hf"
    jobs = {o: next(d for d in rendered(o) if d["kind"] == "Job") for o in OVERLAYS}
    assert set(jobs) == set(OVERLAYS)
    _fast_176b_specifics(isvc("bloom-176b-fast"), jobs["bloom-176b-fast"], dtype="fp16", tp=8)
    _fast_176b_specifics(isvc("bloom-176b-int8"), jobs["bloom-176b-int8"], dtype="int8", tp=4)
    keda = isvc("standard-keda")
    kann, kpred = keda["metadata"]["annotations"], keda["spec"]["predictor"]
    assert (
        kann["serving.kserve.io/deploymentMode"] == "Standard" and kann["serving.kserve.io/autoscalerClass"] == "keda"
    )
    metric = kpred["autoScaling"]["metrics"][0]["external"]["metric"]
    assert metric["backend"] == "prometheus" and "bloom_server_queue_depth" in metric["query"]
    assert keda["metadata"]["name"] + "-predictor" in metric["query"]


def _fast_176b_specifics(isvc: dict, job: dict, dtype: str, tp: int) -> None:
    """bloom-176b-fast (fp16, 8 ranks, scale to zero) and bloom-176b-int8 (weight-only int8, 4 ranks, one replica
    warm): the official checkpoint's safetensors only, pre-sharded for the server's ranks in its dtype, kernels for
    the A100 in the directory served, and limits whose memory fits an A100 80GB."""
    from fnmatch import fnmatch

    from bloom_server.fast.shapes import PRESETS

    pred, ann = isvc["spec"]["predictor"], isvc["metadata"]["annotations"]
    env = _env(pred["containers"][0])
    assert ann["serving.kserve.io/deploymentMode"] == "Knative"
    if dtype == "fp16":
        assert pred["minReplicas"] == 0 and "autoscaling.knative.dev/scale-to-zero-pod-retention-period" in ann
    assert pred["scaleTarget"] == int(env["BLOOM_MAX_BATCH_SIZE"]) <= pred["containerConcurrency"]
    assert int(env["BLOOM_MAX_QUEUED_REQUESTS"]) >= pred["containerConcurrency"]
    assert (env["BLOOM_BACKEND"], env["BLOOM_DTYPE"], env["BLOOM_NUM_GPUS"]) == ("fast", dtype, str(tp))
    assert _gpus(pred["containers"][0]) == (tp, tp)
    assert pred["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    spec = job["spec"]["template"]["spec"]
    download, preshard = spec["initContainers"]
    args = [str(a) for a in download["args"]]
    assert args[args.index("--repo-id") + 1] == "bigscience/bloom"
    i = args.index("--allow-patterns") + 1
    patterns = args[i : next(j for j in range(i, len(args)) if args[j].startswith("--"))]
    fetched = [f for f in ("model_00001-of-00072.safetensors", "model.safetensors.index.json", "config.json",
                           "tokenizer.json", "pytorch_model_00001-of-00072.bin", "flax_model.msgpack")
               if any(fnmatch(f, p) for p in patterns)]  # fmt: skip
    assert fetched == ["model_00001-of-00072.safetensors", "model.safetensors.index.json", "config.json",
                       "tokenizer.json"]  # fmt: skip
    assert _runs(preshard, "preshard") and _flag([preshard], "--dtype") == dtype
    assert _flag([preshard], "--tp") == env["BLOOM_NUM_GPUS"]
    served = "/mnt/pvc/" + env["STORAGE_URI"].split("/", 3)[3]
    assert _flag([preshard], "--out") == served != _flag([preshard], "--model") == _flag([download], "--local-dir")
    # Per GPU: this rank's weights (1/tp of the split tensors, the replicated ones whole) plus the KV cache the fast
    # engine preallocates (max_batch x (max_input + max_new) tokens) must leave at least 10 GiB of the 80 GiB.
    shape = PRESETS["176b"]
    h = shape.hidden_size
    replicated = shape.n_layer * 6 * h + 4 * h  # two biases and two layer norms per layer, two layer norms outside
    weights = ((shape.params() - replicated) // tp + replicated) * 2
    if dtype == "int8":  # the block linears and the embedding at 1 byte, fp32 scales of their rows (fast/quant.py)
        linears = shape.n_layer * 12 * h * h + shape.vocab_size * h
        scales = shape.n_layer * (3 * h // tp + h + 4 * h // tp + h) + -(-shape.vocab_size // tp)
        weights = weights - linears // tp + 4 * scales
    tokens = int(env["BLOOM_MAX_INPUT_LENGTH"]) + int(env["BLOOM_MAX_NEW_TOKENS"])
    kv = int(env["BLOOM_MAX_BATCH_SIZE"]) * tokens * shape.kv_bytes_per_token(2) // tp
    assert weights + kv <= (80 - 10) * 2**30, (weights / 2**30, kv / 2**30)


# ------------------------------------------------------------------------------------------------------- checkov


def _checkov(tmp_path: pathlib.Path, docs_by_name: dict[str, list[dict]]) -> subprocess.CompletedProcess:
    d = tmp_path / "checkov"
    d.mkdir()
    for name, docs in docs_by_name.items():
        out = [predictor_pod(x) for x in docs if x["kind"] == "InferenceService"]
        for x in docs:
            if x["kind"] == "Job":
                x = json.loads(json.dumps(x))
                x["metadata"]["namespace"] = "bloom"
                out.append(x)
        (d / f"{name}.yaml").write_text(yaml.safe_dump_all(out, sort_keys=False))
    return run_tool(
        [
            tool("checkov"),
            "--skip-download",
            "--framework",
            "kubernetes",
            "--directory",
            str(d),
            "--skip-check",
            ",".join(CHECKOV_SKIPS),
            "--compact",
            "--quiet",
        ],
        timeout=300,
    )


def test_checkov_on_predictor_pods_and_jobs(tmp_path):
    p = _checkov(tmp_path, {o: rendered(o) for o in OVERLAYS})
    assert p.returncode == 0, output(p)


def test_checkov_catches_a_privileged_container(tmp_path):
    p = _checkov(tmp_path, {"broken": rendered_broken()})
    assert p.returncode != 0 and "CKV_K8S_16" in p.stdout, output(p)  # "Container should not be privileged"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
