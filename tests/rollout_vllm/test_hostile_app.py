"""The app's hostile-input rules in seconds, without vLLM: JSON-safe 422s (NaN), the token off loopback,
image roots after realpath, the `--image-root` option. `TinyEngine` is a test double of the engine API
(engine.DPEngine's methods), not of the app under test; the real engine is covered in test_hostile_server.py."""

import json
import os

import pytest
from fastapi.testclient import TestClient

from toolkit.rollout import errors
from toolkit.rollout.server.app import create_app
from toolkit.rollout.server.image_paths import allowed_file, check_image_paths, image_roots


class TinyEngine:
    def health(self):
        return True, ""

    def world_size(self):
        return 1

    def info(self):
        return {
            "model": "/m",
            "max_model_len": 64,
            "dtype": "float32",
            "weight_version": 0,
            "device": "cpu",
            "data_parallel_size": 1,
            "tensor_parallel_size": 1,
        }

    def weights_schema(self):
        return None

    def infer(self, prompts, sampling, expect_version, timeout_s, images=None):
        return [
            {"prompt_ids": p, "completion_ids": [1], "text": "", "finish_reason": "length", "weight_version": 0}
            for p in prompts
        ]

    def reset_prefix_cache(self, timeout_s):
        return 0

    def close_communicator(self, timeout_s):
        return None


INFER = {"request_id": "r1", "prompts": [[1, 2, 3]], "sampling": [{"max_tokens": 2}]}


def raw(client, path, text):
    return client.post(path, content=text, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "NaN"),
        ("repetition_penalty", "-Infinity"),
        ("seed", "1e999"),
    ],
)
def test_non_finite_numbers_are_a_422_naming_the_field_not_a_bare_500(field, value):
    c = TestClient(create_app(TinyEngine()))
    r = raw(
        c,
        "/infer/",
        '{"request_id": "n", "prompts": [[1]], "sampling": [{"max_tokens": 2, "' + field + '": ' + str(value) + "}]}",
    )
    assert r.status_code == 422, r.text
    body = r.json()  # JSON, not "Internal Server Error"
    assert body["error"] == "BadRequest" and any(e["loc"][-1] == field for e in body["detail"])
    r = raw(c, "/init_communicator/", '{"port": 50000, "world_size": 2, "timeout_s": NaN}')
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "timeout_s"]


def test_off_loopback_every_endpoint_but_health_needs_the_token():
    c = TestClient(create_app(TinyEngine(), token="s3cret", token_for_all=True))
    assert c.get("/health/").status_code == 200
    for method, path, body in [
        ("GET", "/get_world_size/", None),
        ("GET", "/info/", None),
        ("GET", "/weights_schema/", None),
        ("POST", "/infer/", INFER),
        ("POST", "/reset_prefix_cache/", None),
        ("POST", "/close_communicator/", None),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
    ]:
        r = c.request(method, path, json=body)
        assert r.status_code in (401, 404), (path, r.status_code)  # 404: no interactive docs off loopback
        if r.status_code == 401:
            assert "every endpoint but /health/" in r.json()["detail"]
    auth = {"Authorization": "Bearer s3cret"}
    assert c.post("/infer/", json=INFER, headers=auth).status_code == 200
    assert c.get("/info/", headers=auth).status_code == 200
    assert c.post("/infer/", json=INFER, headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(ValueError):
        create_app(TinyEngine(), token=None, token_for_all=True)


def test_image_paths_checked_after_realpath(tmp_path):
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    good = root / "imgs" / "a.png"
    good.write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    (root / "imgs" / "link.png").symlink_to(secret)
    (root / "imgs" / "inner.png").symlink_to(good)  # a link that stays inside is fine
    roots = image_roots([str(root), str(tmp_path / "missing"), None])
    assert roots == (os.path.realpath(root),)
    assert allowed_file(str(good), roots) == os.path.realpath(good)
    assert allowed_file(str(root / "imgs" / "inner.png"), roots) == os.path.realpath(good)
    for bad in (
        secret,
        root / "imgs" / "link.png",
        root / "imgs" / ".." / ".." / "secret.png",
        root / "nope.png",
        root,
        str(root) + "/a\x00.png",
        str(root) + "/" + "x" * 5000,
    ):
        assert allowed_file(str(bad), roots) is None, bad
    (tmp_path / "data-evil").mkdir()
    (tmp_path / "data-evil" / "a.png").write_bytes(b"x")
    assert allowed_file(str(tmp_path / "data-evil" / "a.png"), roots) is None  # a sibling sharing the root's prefix
    assert check_image_paths([[str(good)], []], 2, roots) == [[os.path.realpath(good)], []]
    with pytest.raises(errors.BadRequest) as missing:
        check_image_paths([[str(root / "nope.png")]], 1, roots)
    with pytest.raises(errors.BadRequest) as forbidden:
        check_image_paths([[str(secret)]], 1, roots)
    assert str(missing.value).replace(repr(str(root / "nope.png")), "P") == str(forbidden.value).replace(
        repr(str(secret)), "P"
    )


def test_serve_help_lists_image_root():
    from click.testing import CliRunner

    from toolkit.rollout.server.cli import serve_command

    out = CliRunner().invoke(serve_command, ["--help"]).output
    assert "--image-root" in out and "every endpoint but /health/" in out


def test_client_names_an_unhealthy_server_and_does_not_retry():
    """The learner's client: a 503 whose body says the server marked itself unhealthy is raised at once,
    with the server's reason (retrying or waiting on a wedged engine only delays the failure)."""
    import requests

    from toolkit.rollout.client import _says_unhealthy

    def response(status, body):
        r = requests.Response()
        r.status_code, r._content = status, json.dumps(body).encode()
        return r

    assert _says_unhealthy(response(503, {"status": "unhealthy", "detail": "dp rank 0 did not finish a generate"}))
    assert _says_unhealthy(response(503, {"detail": "the rollout server is unhealthy: x", "error": "Unavailable"}))
    assert not _says_unhealthy(response(503, {"detail": "dp rank 1 exited", "error": "Unavailable"}))  # still retried
    assert not _says_unhealthy(response(504, {"detail": "the rollout server is unhealthy: x"}))


def serve_to_exit(model, *args: str):
    """`python -m toolkit.rollout.server` (serve_argv: one CPU engine of smoke/b_only on `model`) with `args`,
    run until it exits: the faults below stop it before any engine starts."""
    import subprocess

    from _shared import child_env, free_port
    from _vllm_helpers import ROOT, serve_argv

    argv = serve_argv(model, free_port(), 1) + list(args)
    return subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)


def test_missing_image_root_fails_before_any_engine_starts(tmp_path):
    from _vllm_helpers import ROOT

    proc = serve_to_exit(ROOT / "assets" / "stage1", "--image-root", str(tmp_path / "nope"))
    assert proc.returncode == 1 and f"--image-root {tmp_path / 'nope'} is not a directory" in proc.stderr, proc.stderr


def test_a_damaged_weights_file_is_one_sentence_before_any_engine_starts(tmp_path):
    """A model folder whose safetensors header is cut (copied, then truncated) names the file, no traceback."""
    import shutil

    from _vllm_helpers import ROOT

    model = tmp_path / "model"
    shutil.copytree(ROOT / "assets" / "stage1", model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    proc = serve_to_exit(model)
    assert proc.returncode == 1, proc.stderr
    assert f"{weights}: not a readable safetensors file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
