"""Package sources without the network: the index configuration of pip and uv, the simple API (PEP 503 HTML and
PEP 691 JSON, over a local HTTP server and file://), a dead index failing once per run, direct references (local
wheels and trees, git refs of a local repository) and the cell cache key of local files."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness import direct, envs, index
from harness.index import IndexConfig, IndexSource, IndexUnreachable
from harness.matrix import AxisValue, CellSpec, load_matrix, resolve_cell
from harness.runner import Progress, RunOptions, run_cells
from tests.harness.wheelkit import broken_wheel, isolated_index_env, write_index

WHEEL = "demo-{v}-py3-none-any.whl"


# ----------------------------------------------------------------------------------------------- configuration

def clean_env(**kw: str) -> dict[str, str]:
    """An environment with no pip/uv settings of the machine (pip reads no config file) plus ``kw``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "UV_NO_CONFIG": "1", **kw}


def test_defaults_to_pypi(tmp_path):
    cfg = IndexConfig.from_environment(clean_env(), cwd=tmp_path)
    assert cfg.index_url == index.PYPI and cfg.extra_index_urls == () and cfg.find_links == ()
    assert cfg.install_args("uv") == ["--default-index", index.PYPI]
    assert cfg.install_args("pip") == ["--index-url", index.PYPI]


def test_environment_variables_of_both_tools(tmp_path):
    env = clean_env(PIP_INDEX_URL="https://pip.mirror/simple", PIP_EXTRA_INDEX_URL="https://a/simple https://b/simple",
                    PIP_FIND_LINKS="/wheels", UV_INDEX="internal=https://uv.extra/simple")
    cfg = IndexConfig.from_environment(env, cwd=tmp_path)
    assert cfg.index_url == "https://pip.mirror/simple" and cfg.origin["index_url"] == "pip environment"
    assert cfg.extra_index_urls == ("https://uv.extra/simple", "https://a/simple", "https://b/simple")
    assert cfg.find_links == ("/wheels",)
    assert cfg.install_args("uv") == [
        "--default-index", "https://pip.mirror/simple", "--index", "https://uv.extra/simple", "--index",
        "https://a/simple", "--index", "https://b/simple", "--find-links", "/wheels",
        "--index-strategy", "unsafe-best-match"]
    # uv's own variable names the primary index when both are set (uv would use it; pip gets it explicitly)
    cfg = IndexConfig.from_environment({**env, "UV_DEFAULT_INDEX": "https://uv.mirror/simple/"}, cwd=tmp_path)
    assert cfg.index_url == "https://uv.mirror/simple" and cfg.origin["index_url"] == "uv environment"
    assert "https://pip.mirror/simple" not in cfg.sources                 # a replaced primary is not an extra
    assert IndexConfig.from_environment(clean_env(PIP_NO_INDEX="1", PIP_FIND_LINKS="/w"), cwd=tmp_path).install_args(
        "pip") == ["--no-index", "--find-links", "/w"]


def test_pip_and_uv_config_files(tmp_path):
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("[global]\nindex-url = https://conf.mirror/simple\n"
                        "[install]\nextra-index-url = file:///srv/simple\nfind-links = /srv/wheels\n")
    cfg = IndexConfig.from_environment(clean_env(PIP_CONFIG_FILE=str(pip_conf)), cwd=tmp_path)
    assert (cfg.index_url, cfg.extra_index_urls, cfg.find_links) == (
        "https://conf.mirror/simple", ("file:///srv/simple",), ("/srv/wheels",))
    assert cfg.origin["index_url"] == "pip config"
    uv_toml = tmp_path / "uv.toml"
    uv_toml.write_text('[[index]]\nurl = "https://uv.conf/simple"\ndefault = true\n'
                       '[[index]]\nname = "extra"\nurl = "https://uv.extra/simple"\n')
    env = clean_env(PIP_CONFIG_FILE=str(pip_conf), UV_CONFIG_FILE=str(uv_toml))
    env.pop("UV_NO_CONFIG")
    cfg = IndexConfig.from_environment(env, cwd=tmp_path)
    assert cfg.index_url == "https://uv.conf/simple" and cfg.origin["index_url"] == "uv config"
    assert cfg.extra_index_urls == ("https://uv.extra/simple", "file:///srv/simple")
    # the project's uv.toml is found from the working directory (what `uv pip install` run there would read)
    env.pop("UV_CONFIG_FILE")
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "uv.toml").write_text('[pip]\nindex-url = "https://project.uv/simple"\n')
    cfg = IndexConfig.from_environment({**env, "XDG_CONFIG_HOME": str(tmp_path / "none")}, cwd=tmp_path / "proj" / "sub")
    assert cfg.index_url == "https://project.uv/simple"
    (tmp_path / "bad.toml").write_text("index-url = [")
    with pytest.raises(index.IndexConfigError, match="bad.toml"):
        IndexConfig.from_environment({**env, "UV_CONFIG_FILE": str(tmp_path / "bad.toml")}, cwd=tmp_path)


# ----------------------------------------------------------------------------------------------- simple API

class Server:
    """A local HTTP index: path -> (status, content type, body); counts requests per path."""

    def __init__(self, pages: dict[str, tuple[int, str, bytes]]):
        self.pages, self.hits = pages, {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's API
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                status, ctype, body = outer.pages.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(pages):
        servers.append(Server(pages))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_pep691_json_and_pep503_html(server):
    files = [{"filename": WHEEL.format(v="1.0"), "url": "../../f/" + WHEEL.format(v="1.0"),
              "hashes": {"sha256": "aa" * 32}, "upload-time": "2026-01-01T00:00:00Z"},
             {"filename": WHEEL.format(v="2.0rc1"), "url": "/f/" + WHEEL.format(v="2.0rc1"), "hashes": {}},
             {"filename": WHEEL.format(v="3.0"), "url": "/f/x", "hashes": {}, "yanked": "broken"},
             {"filename": WHEEL.format(v="4.0"), "url": "/f/y", "hashes": {}, "requires-python": ">=3.99"},
             {"filename": "demo-5.0-cp27-cp27mu-manylinux1_x86_64.whl", "url": "/f/z", "hashes": {}},
             {"filename": "demo-1.5.tar.gz", "url": "/f/demo-1.5.tar.gz", "hashes": {}}]
    html = ('<a href="/f/other-9.0-py3-none-any.whl">other-9.0-py3-none-any.whl</a>'
            f'<a href="/f/{WHEEL.format(v="1.1")}#sha256={"bb" * 32}" data-requires-python="&gt;=3.8">w</a>'
            f'<a href="/f/{WHEEL.format(v="1.2")}" data-yanked="">y</a>')
    srv = server({"/simple/demo/": (200, "application/vnd.pypi.simple.v1+json", json.dumps({"files": files}).encode()),
                  "/simple/html-demo/": (200, "text/html", html.replace("demo-", "html_demo-").encode())})
    src = IndexSource(IndexConfig(f"{srv.url}/simple"))
    assert src("demo") == ["1.0", "1.5", "2.0rc1"]          # yanked, wrong Python, unsupported wheel tag left out
    prov = src.provenance("demo", "1.0")
    assert prov["files"] == {WHEEL.format(v="1.0"): "aa" * 32} and prov["uploaded"] == "2026-01-01T00:00:00Z"
    assert prov["sources"] == [f"{srv.url}/simple"]
    assert src("html-demo") == ["1.1"]                          # other projects' and yanked files left out
    assert src.files("html-demo")[0].sha256 == "bb" * 32
    assert src("absent") == []                                 # 404: not on this index
    src("demo")
    assert srv.hits["/simple/demo/"] == 1                      # one query per package per run


def test_file_index_and_find_links(tmp_path):
    wheels = [broken_wheel("demo", "1.0", tmp_path / "w")]
    simple = write_index(tmp_path / "idx", wheels)
    broken_wheel("demo", "2.0", tmp_path / "links")
    src = IndexSource(IndexConfig(simple.as_uri(), find_links=(str(tmp_path / "links"),)))
    assert src("demo") == ["1.0", "2.0"] and src("absent") == []
    assert src.provenance("demo", "1.0")["files"] == {wheels[0].name: hashlib.sha256(wheels[0].read_bytes()).hexdigest()}
    assert src.provenance("demo", "2.0")["sources"] == [str(tmp_path / "links")]
    with pytest.raises(IndexUnreachable, match="does not exist"):
        IndexSource(IndexConfig((tmp_path / "nowhere").as_uri()))("demo")


def test_dead_index_fails_once_per_run(server):
    srv = server({"/simple/a/": (503, "text/plain", b"down")})
    src = IndexSource(IndexConfig(f"{srv.url}/simple"))
    with pytest.raises(IndexUnreachable, match="HTTP 503"):
        src("a")
    with pytest.raises(IndexUnreachable, match="not asked again"):
        src("b")                                              # another package: the dead index is not asked again
    with pytest.raises(IndexUnreachable, match="HTTP 503"):
        src("a")                                              # the same package: the memoized error
    assert srv.hits == {"/simple/a/": 1}
    refused = IndexSource(IndexConfig("http://127.0.0.1:9/simple"), timeout=5)   # discard port: connection refused
    with pytest.raises(IndexUnreachable, match="unreachable"):
        refused("a")


def test_every_cell_reports_the_dead_index(server, tmp_path):
    srv = server({"/simple/pytest/": (500, "text/plain", b"boom"), "/simple/hypothesis/": (500, "text/plain", b"")})
    (tmp_path / "m.toml").write_text('[matrix]\ntests = ["x"]\n[[axis]]\npackage = "pytest"\nprefix = "p"\n'
                                     'values = [{ id = "a", spec = "" }, { id = "b", spec = "==8.*" }]\n'
                                     '[[axis]]\npackage = "hypothesis"\nprefix = "h"\n'
                                     'values = [{ id = "1", spec = "" }, { id = "2", spec = "" }]\n')
    m = load_matrix(tmp_path / "m.toml")
    built = []
    recs = run_cells(m, m.cells(), source=IndexSource(IndexConfig(f"{srv.url}/simple")), run_dir=tmp_path / "r",
                     opts=RunOptions(jobs=2, envs_dir=tmp_path / "envs"),
                     build_env=lambda *a, **k: built.append(a), progress=Progress(io.StringIO(), heartbeat_s=0))
    assert [r["status"] for r in recs] == ["error"] * 4 and built == []
    assert all("resolve failed (IndexUnreachable)" in r["message"] and "HTTP 500" in r["message"] for r in recs)
    assert sum(srv.hits.values()) == 1                         # the first query killed the index for the run


# ----------------------------------------------------------------------------------------------- resolution

def test_resolve_cell_with_pre_and_direct_values(tmp_path):
    wheel = broken_wheel("other", "3.0.dev1", tmp_path)
    values = {"demo": AxisValue("demo", "next", ">=2.0rc0", pre=True), "other": AxisValue("other", "w", path=str(wheel))}
    table = {"demo": ["1.0", "2.0rc1", "2.0", "2.1rc2"]}
    res = resolve_cell(CellSpec("c", {"demo": ">=2.0rc0"}, {}, values), lambda p: table[p])
    assert res.resolved == {"demo": "2.1rc2", "other": "3.0.dev1"}
    assert res.sources["demo"]["pre"] is True
    assert res.sources["other"] == {"kind": "wheel", "path": str(wheel.resolve()), "version": "3.0.dev1",
                                    "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    assert res.requirements() == ["demo==2.1rc2", f"other @ {wheel.resolve().as_uri()}"]
    # without `pre` a pre-release-only spec is unreleased
    res = resolve_cell(CellSpec("c", {"demo": "==2.1.*"}, {}, {}), lambda p: table[p])
    assert "no release of demo matches '==2.1.*'" in res.unreleased["demo"]


def test_path_values_that_cannot_be_used(tmp_path):
    wheel = broken_wheel("demo", "1.0", tmp_path)
    with pytest.raises(direct.SourceError, match="distribution of demo, not of peft"):
        direct.resolve_path("peft", str(wheel))
    with pytest.raises(direct.SourceError, match="does not exist"):
        direct.resolve_path("peft", str(tmp_path / "nope.whl"))
    (tmp_path / "tree").mkdir()
    with pytest.raises(direct.SourceError, match="not a source tree"):
        direct.resolve_path("peft", str(tmp_path / "tree"))


def test_source_tree_digest_and_cache_key(tmp_path):
    tree = tmp_path / "demo"
    (tree / "demo").mkdir(parents=True)
    (tree / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0.3"\n')
    (tree / "demo" / "__init__.py").write_text("x = 1\n")
    req, src = direct.resolve_path("demo", str(tree))
    assert src["kind"] == "tree" and src["version"] == "0.3" and req == f"demo @ {tree.as_uri()}"
    key = envs.requirements_key([req])
    (tree / "demo" / "__pycache__").mkdir()
    (tree / "demo" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    assert envs.requirements_key([req]) == key                 # byte code does not change the source
    (tree / "demo" / "__init__.py").write_text("x = 2\n")
    assert envs.requirements_key([req]) != key                 # a changed line rebuilds the cell venv
    assert direct.is_local_tree(req) and not direct.is_local_tree("demo==1.0")


def test_wheel_content_is_part_of_the_cache_key(tmp_path):
    wheel = broken_wheel("demo", "1.0", tmp_path, error="a")
    req = f"demo @ {wheel.as_uri()}"
    key = envs.requirements_key([req])
    broken_wheel("demo", "1.0", tmp_path, error="b")
    assert envs.requirements_key([req]) != key and envs.requirements_key(["demo==1.0"]) == envs.requirements_key(
        ["demo==1.0"])


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_vcs_refs_resolve_to_commits(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "f").write_text("1")
    git("add", "f", cwd=repo)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one", cwd=repo)
    first = git("rev-parse", "HEAD", cwd=repo)
    git("tag", "-a", "v1", "-m", "v1", cwd=repo)
    (repo / "f").write_text("2")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "two", cwd=repo)
    second = git("rev-parse", "HEAD", cwd=repo)
    url = repo.as_uri()
    assert direct.split_vcs(f"git+{url}@main") == (url, "main")
    assert direct.split_vcs("git+ssh://git@github.com/o/r.git") == ("ssh://git@github.com/o/r.git", "HEAD")
    req, src = direct.resolve_vcs("demo", f"git+{url}@main")
    assert src == {"kind": "vcs", "url": url, "ref": "main", "commit": second, "version": None}
    assert req == f"demo @ git+{url}@{second}"
    assert direct.resolve_vcs_ref(url, "v1") == first           # an annotated tag: the commit, not the tag object
    assert direct.resolve_vcs_ref(url, first) == first
    with pytest.raises(direct.SourceError, match="no branch, tag or ref named 'nope'"):
        direct.resolve_vcs_ref(url, "nope")
    with pytest.raises(direct.SourceError, match="exited"):
        direct.resolve_vcs_ref((tmp_path / "missing").as_uri(), "main")
    with pytest.raises(direct.SourceError, match="only git"):
        direct.split_vcs("hg+https://x/y@z")


def test_matrix_values_with_path_vcs_pre(write_matrix):
    """The axis-value grammar reaches resolution: `pre` on the value, `path`/`vcs` as direct values (no spec)."""
    m = load_matrix(write_matrix('[[axis]]\npackage = "peft"\nprefix = "p"\nvalues = [\n'
                                 '  { id = "next", spec = ">=0.22.0rc0", pre = true },\n'
                                 '  { id = "local", path = "dist/peft.whl" },\n'
                                 '  { id = "main", vcs = "git+https://github.com/huggingface/peft@main" },\n]\n'))
    cells = {c.id: c for c in m.cells()}
    assert cells["pnext"].axis_values["peft"].pre and cells["pnext"].specs["peft"] == ">=0.22.0rc0"
    res = resolve_cell(cells["pnext"], lambda p: ["0.21.2", "0.22.0rc1"])
    assert res.resolved == {"peft": "0.22.0rc1"}
    with pytest.raises(direct.SourceError, match="dist/peft.whl"):   # resolved as a path, not looked up on an index
        resolve_cell(cells["plocal"], lambda p: pytest.fail(f"index asked for {p}"))
    assert "peft" not in cells["pmain"].specs and cells["pmain"].axis_values["peft"].vcs.endswith("@main")


def test_isolated_env_reaches_only_the_local_index(tmp_path, monkeypatch):
    simple = write_index(tmp_path / "idx", [broken_wheel("demo", "1.0", tmp_path / "w")])
    isolated_index_env(monkeypatch, simple.as_uri(), var="UV_INDEX_URL")
    cfg = IndexConfig.from_environment()
    assert cfg.sources == (simple.as_uri(),) and cfg.origin == {"index_url": "uv environment"}
