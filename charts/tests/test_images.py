"""Tests of the image root filesystems (images/assemble-rootfs.sh).

The node-agent image is FROM scratch plus iptables/ipset copied from this
machine with their libraries and extensions. The strongest check that nothing
is missing: apply every rule set the node agent generates (its golden files,
node-agent/testdata/**.golden) with the image's own binaries, chrooted into
the assembled tree, in a fresh network namespace, for both iptables backends.
Needs root (netns, chroot); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSEMBLE = REPO / "images" / "assemble-rootfs.sh"
GOLDENS = sorted((REPO / "node-agent" / "testdata").glob("**/*.golden"))


def assemble(dest: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ASSEMBLE), str(dest), *args], capture_output=True, text=True, timeout=300)


def static_test_binary(workdir: Path) -> Path | None:
    """A tiny static executable, or None when no C compiler can make one."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = workdir / "hello.c"
    src.write_text("int main(void) { return 0; }\n")
    out = workdir / "hello-static"
    res = subprocess.run([cc, "-static", "-o", str(out), str(src)], capture_output=True, text=True)
    return out if res.returncode == 0 else None


class RootfsLayout(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="gm-rootfs-"))

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_base_layout(self):
        dest = self.tmp / "root"
        res = assemble(dest)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(os.readlink(dest / "var" / "run"), "../run")
        self.assertEqual(stat.S_IMODE((dest / "tmp").stat().st_mode), 0o1777)
        self.assertIn("nonroot:x:65532:65532", (dest / "etc" / "passwd").read_text())
        for d in ("proc", "sys", "dev", "usr/local/bin"):
            self.assertTrue((dest / d).is_dir(), d)

    def test_refuses_dynamic_binary(self):
        dynamic = shutil.which("ls")
        res = assemble(self.tmp / "root", "--binary", f"{dynamic}:/usr/local/bin/ls")
        self.assertNotEqual(res.returncode, 0)
        self.assertIn("dynamically linked", res.stderr)

    def test_refuses_missing_binary_and_bad_spec(self):
        res = assemble(self.tmp / "a", "--binary", f"{self.tmp}/nope:/usr/local/bin/x")
        self.assertNotEqual(res.returncode, 0)
        self.assertIn("does not exist", res.stderr)
        res = assemble(self.tmp / "b", "--binary", "no-colon")
        self.assertNotEqual(res.returncode, 0)
        self.assertIn("SRC:PATH", res.stderr)

    def test_refuses_non_empty_destination(self):
        dest = self.tmp / "root"
        dest.mkdir()
        (dest / "x").write_text("")
        res = assemble(dest)
        self.assertNotEqual(res.returncode, 0)
        self.assertIn("not empty", res.stderr)

    def test_static_binary_is_installed_and_runs_alone(self):
        binary = static_test_binary(self.tmp)
        if binary is None:
            self.skipTest("no C compiler able to link statically (cc -static)")
        dest = self.tmp / "root"
        res = assemble(dest, "--binary", f"{binary}:/opt/istio-cni/bin/istio-cni")
        self.assertEqual(res.returncode, 0, res.stderr)
        installed = dest / "opt" / "istio-cni" / "bin" / "istio-cni"
        self.assertTrue(os.access(installed, os.X_OK))
        if os.geteuid() != 0:
            self.skipTest("chroot needs root")
        run = subprocess.run(["chroot", str(dest), "/opt/istio-cni/bin/istio-cni"], capture_output=True)
        self.assertEqual(run.returncode, 0, run.stderr)


@unittest.skipUnless(os.geteuid() == 0, "needs root: chroot and network namespaces")
class IptablesInImage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        missing = [
            t
            for t in ("xtables-nft-multi", "xtables-legacy-multi", "ipset", "nft", "unshare", "chroot")
            if not shutil.which(t)
        ]
        if missing:
            raise unittest.SkipTest(f"{', '.join(missing)} not installed (scripts/install-deps.sh installs them)")
        cls.tmp = Path(tempfile.mkdtemp(prefix="gm-rootfs-ipt-"))
        cls.root = cls.tmp / "root"
        res = assemble(cls.root, "--iptables")
        if res.returncode != 0:
            raise AssertionError(f"assemble-rootfs --iptables failed: {res.stderr}")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def in_fresh_netns(self, script: str) -> subprocess.CompletedProcess:
        """Run a bash script in new net+mount namespaces with /proc mounted in the image root."""
        prelude = f"set -euo pipefail\nmount --make-rprivate /\nmount -t proc proc '{self.root}/proc'\nR='{self.root}'\n"
        return subprocess.run(
            ["unshare", "--net", "--mount", "--", "bash", "-c", prelude + script],
            capture_output=True, text=True, timeout=120,
        )

    def test_binaries_and_symlinks(self):
        sbin = self.root / "usr" / "sbin"
        for fam in ("iptables", "ip6tables"):
            for variant in ("nft", "legacy"):
                for op in ("", "-save", "-restore"):
                    self.assertTrue((sbin / f"{fam}-{variant}{op}").exists(), f"{fam}-{variant}{op}")
        res = self.in_fresh_netns('chroot "$R" /usr/sbin/iptables-nft -V && chroot "$R" /usr/sbin/iptables-legacy -V && chroot "$R" /usr/sbin/ipset version')
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("nf_tables", res.stdout)
        self.assertIn("legacy", res.stdout)

    def test_node_agent_nft_scripts_apply_with_the_image_binary(self):
        scripts = sorted((REPO / "node-agent" / "testdata" / "inpod-nft").glob("*.nft"))
        self.assertTrue(scripts, "no node-agent nft golden scripts found")
        for script in scripts:
            with self.subTest(script=script.name):
                res = self.in_fresh_netns(f'chroot "$R" /usr/sbin/nft -f - < \'{script}\'\nchroot "$R" /usr/sbin/nft list ruleset\n')
                self.assertEqual(res.returncode, 0, res.stderr)
                if "remove" not in script.name:
                    self.assertIn("table inet istio-ambient-nat", res.stdout)

    def test_node_agent_rule_sets_apply_with_the_image_binaries(self):
        self.assertTrue(GOLDENS, "no node-agent golden rule files found")
        for golden in GOLDENS:
            family = "ip6tables" if golden.stem.endswith("_v6") else "iptables"
            inet = "inet6" if family == "ip6tables" else "inet"
            text = golden.read_text()
            if "*" not in text:
                continue
            sets = sorted(set(re.findall(r"--match-set (\S+)", text)))
            chains = sorted(set(re.findall(r"^:(\S+)", text, re.MULTILINE)))
            for backend in ("nft", "legacy"):
                with self.subTest(golden=str(golden.relative_to(REPO)), backend=backend):
                    script = "".join(
                        f'chroot "$R" /usr/sbin/ipset create {s} hash:ip family {inet} comment\n' for s in sets
                    )
                    script += f'chroot "$R" /usr/sbin/{family}-{backend}-restore --noflush < \'{golden}\'\n'
                    script += f'chroot "$R" /usr/sbin/{family}-{backend}-save\n'
                    res = self.in_fresh_netns(script)
                    self.assertEqual(res.returncode, 0, res.stderr)
                    for chain in chains:
                        self.assertIn(f":{chain} ", res.stdout)


if __name__ == "__main__":
    unittest.main()
