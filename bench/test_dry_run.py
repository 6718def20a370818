#!/usr/bin/env python3
"""CPU test of the benchmarks' report code (registered with ctest): both benchmarks in their
--dry-run mode (fake timings, no GPU, no torch) into a scratch BENCHMARKS.md, twice, so that the
second run replaces its section instead of adding one; and the forward + backward roofline of
one case against numbers worked out by hand. Run: python3 bench/test_dry_run.py [LIBDEFT]"""
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import bench_backward  # noqa: E402

LIB = sys.argv.pop(1) if len(sys.argv) > 1 else os.path.join(HERE, "..", "build", "libdeft.so")


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                          capture_output=True, text=True, timeout=300)


class DryRuns(unittest.TestCase):
    def test_both_reports_into_one_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            md = os.path.join(tmp, "BENCHMARKS.md")
            with open(md, "w") as f:
                f.write("# kept\n\nhand-written text\n")
            for _ in range(2):
                fwd = run("bench.py", "--dry-run", "--lib", LIB, "--out", os.path.join(tmp, "f"),
                          "--benchmarks-md", md)
                self.assertEqual(fwd.returncode, 0, fwd.stdout + fwd.stderr)
                bwd = run("bench_backward.py", "--dry-run", "--out", os.path.join(tmp, "b"),
                          "--benchmarks-md", md)
                self.assertEqual(bwd.returncode, 0, bwd.stdout + bwd.stderr)
            text = open(md).read()
            self.assertTrue(text.startswith("# kept\n\nhand-written text\n"))
            self.assertEqual(text.count(bench.BEGIN_MARK), 1)
            self.assertEqual(text.count(bench_backward.BEGIN), 1)
            self.assertIn("DRY RUN", text)
            names = [c["name"] for c in bench.load_shapes(os.path.join(HERE, "shapes.json"))["cases"]]
            section = text[text.index(bench_backward.BEGIN):text.index(bench_backward.END)]
            self.assertIn("| roofline ms (of deft) |", section)
            for name in names:
                for dtype in bench_backward.DTYPES:
                    self.assertIn(f"| {name} | nchw | {dtype} | ", section)
            self.assertNotIn("| nhwc |", section)  # nchw unless asked


    def test_a_partial_forward_run_leaves_the_section(self):
        with tempfile.TemporaryDirectory() as tmp:
            md = os.path.join(tmp, "BENCHMARKS.md")
            full = run("bench.py", "--dry-run", "--lib", LIB, "--out", os.path.join(tmp, "f"),
                       "--benchmarks-md", md)
            self.assertEqual(full.returncode, 0, full.stdout + full.stderr)
            before = open(md).read()
            part = run("bench.py", "--dry-run", "--lib", LIB, "--dtypes", "fp16", "--out",
                       os.path.join(tmp, "p"), "--benchmarks-md", md)
            self.assertEqual(part.returncode, 0, part.stdout + part.stderr)
            self.assertIn("left as it was", part.stderr)
            self.assertEqual(open(md).read(), before)

    def test_a_partial_backward_run_leaves_the_section(self):
        # a run of one dtype must not replace the table of all (it would drop the other rows)
        with tempfile.TemporaryDirectory() as tmp:
            md = os.path.join(tmp, "BENCHMARKS.md")
            full = run("bench_backward.py", "--dry-run", "--out", os.path.join(tmp, "b"),
                       "--benchmarks-md", md)
            self.assertEqual(full.returncode, 0, full.stdout + full.stderr)
            before = open(md).read()
            part = run("bench_backward.py", "--dry-run", "--dtypes", "fp16", "--out",
                       os.path.join(tmp, "p"), "--benchmarks-md", md)
            self.assertEqual(part.returncode, 0, part.stdout + part.stderr)
            self.assertIn("left as it was", part.stderr)
            self.assertEqual(open(md).read(), before)
            forced = run("bench_backward.py", "--dry-run", "--dtypes", "fp16", "--partial-md",
                         "--out", os.path.join(tmp, "p"), "--benchmarks-md", md)
            self.assertEqual(forced.returncode, 0, forced.stdout + forced.stderr)
            self.assertNotIn("| fp32 | ", open(md).read())


    def test_backward_layouts(self):
        # --layouts nchw,nhwc: a row per layout (and such a run replaces the section); a
        # layout that does not exist is refused by name
        with tempfile.TemporaryDirectory() as tmp:
            md = os.path.join(tmp, "BENCHMARKS.md")
            both = run("bench_backward.py", "--dry-run", "--layouts", "nchw,nhwc", "--out",
                       os.path.join(tmp, "b"), "--benchmarks-md", md)
            self.assertEqual(both.returncode, 0, both.stdout + both.stderr)
            text = open(md).read()
            self.assertIn("| dense512 | nchw | fp16 | ", text)
            self.assertIn("| dense512 | nhwc | fp16 | ", text)
            self.assertIn("NCHW, NHWC (NHWC rows:", text)
            bad = run("bench_backward.py", "--dry-run", "--layouts", "nchw,chwn", "--out",
                      os.path.join(tmp, "x"))
            self.assertNotEqual(bad.returncode, 0)
            self.assertIn("chwn", bad.stderr)


class Roofline(unittest.TestCase):
    def test_forward_backward_bytes_and_flops(self):
        # n=1, c=k=8, 4x4, 3x3 pad 1, mask: input 128, offset 288, mask 144, weight 576,
        # output 128 elements; 3 x (128 + 288 + 144 + 576) + 2 x 128 = 3664 elements.
        case = bench.parse_case({"name": "t", "n": 1, "c": 8, "k": 8, "h": 4, "w": 4, "r": 3,
                                 "s": 3, "pad": 1})
        r = bench_backward.fb_roofline(case, "fp16", {"hbm_bytes_per_s": 1e9,
                                                      "fp16_tc_flops_per_s": 1e9})
        self.assertEqual(r["bytes"], 3664 * 2)
        self.assertEqual(r["flops"], 3 * 2 * 16 * 8 * 8 * 9)  # 3 GEMMs of 16 px x 8 x 72
        self.assertAlmostEqual(r["roofline_ms"], max(3664 * 2, 3 * 2 * 16 * 8 * 8 * 9) / 1e9 * 1e3)
        self.assertEqual(r["bound"], "compute")
        self.assertNotIn("roofline_ms", bench_backward.fb_roofline(case, "fp32", {}))


class ModifiedVariant(unittest.TestCase):
    """--backward-data-variant '+field=value ...': the pass's own choice with those fields set
    (added where the choice has no such field), its other fields kept in order."""

    class FakeLib:
        def __init__(self):
            self.asked = []

        def compile(self, desc, variant, cache_path):
            self.asked.append((desc, variant, cache_path))

            class K:
                variant = "algo=depthwise tm=8 tn=1 tk=1 threads=256 gin=gather gw=fused"
            return K()

    def test_fields_replaced_and_added(self):
        lib = self.FakeLib()
        got = bench_backward.modified_variant(lib, "deform_conv2d n=1 pass=backward_data",
                                              "gw=separate det=1", "/tmp/db")
        self.assertEqual(got, "algo=depthwise tm=8 tn=1 tk=1 threads=256 gin=gather gw=separate det=1")
        self.assertEqual(lib.asked, [("deform_conv2d n=1 pass=backward_data", None, "/tmp/db")])


if __name__ == "__main__":
    unittest.main()
