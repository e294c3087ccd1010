"""The Hub API test double (`hub_server.py`) driven by the real `huggingface_hub` client over HTTP on 127.0.0.1,
and by the `push_to_hub` / `from_pretrained` methods of transformers and diffusers."""

import random
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_session,
    hf_api,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub_server import LocalHubServer, set_hub_offline, use_local_hub


REPO = "test-user/tiny-repo"


def _write_folder(root: Path) -> dict[str, bytes]:
    """A small folder to upload (nested files and a 1 MiB binary); returns {path in repo: content}."""
    files = {
        "config.json": b'{"hidden_size": 8}\n',
        "nested/notes.txt": b"first version\n",
        "nested/deep/weights.bin": random.Random(0).randbytes(1 << 20),
    }
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return files


def _read_folder(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def _upload_folder(tmp_path: Path) -> tuple[dict[str, bytes], str]:
    """Create `REPO`, upload `_write_folder`'s files; returns them and the commit id."""
    folder = tmp_path / "to_upload"
    files = _write_folder(folder)
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    return files, api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="first upload").oid


def test_upload_folder_then_download_gives_identical_files(local_hub, tmp_path):
    api = HfApi()
    repo_url = api.create_repo(REPO, exist_ok=True)
    assert repo_url.repo_id == REPO and repo_url.startswith(local_hub.endpoint)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # exists already: no error

    files = _write_folder(tmp_path / "to_upload")
    commit = api.upload_folder(repo_id=REPO, folder_path=tmp_path / "to_upload")
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)
    # The Hub starts every repo with a `.gitattributes` commit; the double does the same.
    assert set(api.list_repo_files(REPO)) == set(files) | {".gitattributes"}
    assert api.model_info(REPO).sha == commit.oid

    snapshot = snapshot_download(REPO, cache_dir=tmp_path / "empty_cache")
    assert Path(snapshot).name == commit.oid
    downloaded = _read_folder(snapshot)
    del downloaded[".gitattributes"]
    assert downloaded == files

    weights = hf_hub_download(REPO, "nested/deep/weights.bin", cache_dir=tmp_path / "other_cache")
    assert Path(weights).read_bytes() == files["nested/deep/weights.bin"]

    # Every file went inline in the commit payload: the client never took the LFS or Xet route.
    assert ("POST", f"/api/models/{REPO}/commit/main") in local_hub.requests
    assert not [path for _, path in local_hub.requests if "lfs" in path or "xet" in path]


def test_second_commit_changes_sha_and_files(local_hub, tmp_path):
    files, first_sha = _upload_folder(tmp_path)
    api = HfApi()
    second = api.create_commit(
        repo_id=REPO,
        operations=[
            CommitOperationAdd("config.json", b'{"hidden_size": 16}\n'),
            CommitOperationAdd("extra/added.txt", b"new file\n"),
            CommitOperationDelete("nested/notes.txt"),
        ],
        commit_message="second upload",
    )
    assert second.oid != first_sha
    assert api.model_info(REPO).sha == second.oid
    expected = {".gitattributes", "config.json", "extra/added.txt", "nested/deep/weights.bin"}
    assert set(api.list_repo_files(REPO)) == expected
    assert Path(hf_hub_download(REPO, "config.json")).read_bytes() == b'{"hidden_size": 16}\n'

    # The first commit is still there, by its id.
    assert set(api.list_repo_files(REPO, revision=first_sha)) == set(files) | {".gitattributes"}
    old_config = hf_hub_download(REPO, "config.json", revision=first_sha)
    assert Path(old_config).read_bytes() == files["config.json"]

    # Uploading unchanged content makes no commit: the client compares the file ids the preupload answer gives.
    unchanged = api.upload_file(path_or_fileobj=b"new file\n", path_in_repo="extra/added.txt", repo_id=REPO)
    assert unchanged.oid == second.oid == api.model_info(REPO).sha


def test_offline_mode_serves_the_cache_after_the_server_stops(local_hub, tmp_path, monkeypatch):
    files, sha = _upload_folder(tmp_path)
    snapshot = snapshot_download(REPO)
    single = hf_hub_download(REPO, "config.json")

    address = urlsplit(local_hub.endpoint)
    local_hub.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address.hostname, address.port), timeout=1).close()

    set_hub_offline(monkeypatch)
    assert constants.is_offline_mode()
    offline_snapshot = snapshot_download(REPO)
    assert offline_snapshot == snapshot and Path(offline_snapshot).name == sha
    offline_files = _read_folder(offline_snapshot)
    del offline_files[".gitattributes"]
    assert offline_files == files
    assert hf_hub_download(REPO, "config.json") == single
    with pytest.raises(LocalEntryNotFoundError) as missing:
        snapshot_download("test-user/never-downloaded")
    assert isinstance(missing.value.__cause__, OfflineModeIsEnabled)  # refused by offline mode, no connection tried


def test_errors_map_to_the_client_exceptions(local_hub, tmp_path):
    _, sha = _upload_folder(tmp_path)
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("test-user/missing")
    with pytest.raises(EntryNotFoundError):  # what `ModelCard.load` catches to create a new card
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="no-such-branch")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO, exist_ok=False)
    assert conflict.value.response.status_code == 409

    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    with pytest.raises(HfHubHTTPError) as stale:  # `sha` is no longer the head of main
        api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=REPO, parent_commit=sha)
    assert stale.value.response.status_code == 412


def test_range_request_returns_the_requested_bytes(local_hub, tmp_path):
    files, _ = _upload_folder(tmp_path)
    content = files["nested/deep/weights.bin"]
    url = hf_hub_url(REPO, "nested/deep/weights.bin")

    response = get_session().get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == content[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(content)}"

    assert get_session().get(url, headers={"Range": "bytes=-5"}).content == content[-5:]
    assert get_session().get(url, headers={"Range": f"bytes={len(content)}-"}).status_code == 416


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "::1"])
def test_server_refuses_hosts_other_than_ipv4_loopback(host):
    with pytest.raises(ValueError, match="loopback"):
        LocalHubServer(host=host)


def test_local_hub_listens_on_loopback(local_hub):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", local_hub.endpoint)


def test_use_local_hub_patches_the_client_until_undone(tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_DISABLE_XET, hf_api.api.endpoint)
    patch = pytest.MonkeyPatch()
    try:
        use_local_hub(patch, "http://127.0.0.1:9", tmp_path / "hf_home")  # nothing listens there: nothing is sent
        assert hf_hub_url(REPO, "config.json") == f"http://127.0.0.1:9/{REPO}/resolve/main/config.json"
        assert hf_api.api.endpoint == HfApi().endpoint == "http://127.0.0.1:9"
        assert constants.HF_HUB_CACHE == str(tmp_path / "hf_home" / "hub")
        assert constants.HF_HUB_DISABLE_XET and not constants.is_offline_mode()
    finally:
        patch.undo()
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_DISABLE_XET, hf_api.api.endpoint) == before


def test_transformers_push_to_hub_then_from_pretrained(local_hub, monkeypatch):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=32)
    model = BertModel(config).eval()
    model.push_to_hub("test-user/tiny-bert")
    assert {"config.json", "model.safetensors", "README.md"} <= set(HfApi().list_repo_files("test-user/tiny-bert"))

    loaded = BertModel.from_pretrained("test-user/tiny-bert")
    assert loaded.config.hidden_size == 8
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items())

    # Once downloaded, the model loads from the cache with the server gone and the client offline.
    local_hub.stop()
    set_hub_offline(monkeypatch)
    cached = BertModel.from_pretrained("test-user/tiny-bert")
    assert all(torch.equal(value, expected[name]) for name, value in cached.state_dict().items())


def test_diffusers_push_to_hub_then_from_pretrained(local_hub):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=8,
    )
    vae.push_to_hub("test-user/tiny-vae")
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(HfApi().list_repo_files("test-user/tiny-vae"))

    loaded = AutoencoderKL.from_pretrained("test-user/tiny-vae")
    assert tuple(loaded.config.block_out_channels) == (8,)
    expected = vae.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items())


def test_diffusers_pipeline_push_to_hub_then_from_pretrained(local_hub):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).push_to_hub("test-user/tiny-pipe")
    # Components live in subfolders: the pipeline loader lists the repo tree and downloads each of them.
    assert {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"} <= set(
        HfApi().list_repo_files("test-user/tiny-pipe")
    )

    loaded = DDPMPipeline.from_pretrained("test-user/tiny-pipe")
    assert loaded.scheduler.config.num_train_timesteps == 10
    expected = unet.state_dict()
    assert loaded.unet.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.unet.state_dict().items())
