# lit configuration of deft's codegen golden tests: each .test runs the deft CLI on a layer
# description and checks its output (generated CUDA, PTX, SASS, resources, errors) with
# FileCheck. Run through ctest (codegen_lit), which uses the configured lit.site.cfg.py.
#
# Substitutions:
#   %deft      the CLI with a cache of the test's own: env DEFT_CACHE_DIR=%t.cache <build>/tools/deft
#   %deft_bin  the CLI alone
#   FileCheck  LLVM FileCheck as found by CMake (DEFT_FILECHECK)
#   not        LLVM's `not` (inverts an exit status), next to FileCheck
# Features:
#   nvdisasm   an nvdisasm was found where the CLI looks ($DEFT_NVDISASM, $CUDA_HOME/bin,
#              /usr/local/cuda/bin, $PATH): tests of --emit sass say REQUIRES: nvdisasm
#   system-nvdisasm  /usr/local/cuda/bin/nvdisasm exists (the CLI always finds one)
import os
import shutil

import lit.formats

config.name = "deft-codegen"
config.test_format = lit.formats.ShTest(True)
config.suffixes = [".test"]
config.excludes = ["Inputs"]
config.test_source_root = os.path.dirname(os.path.abspath(__file__))

if not hasattr(config, "deft_cli"):
    lit_config.fatal("run the tests through the configured <build>/tests/lit (ctest -R codegen_lit)")
config.test_exec_root = config.deft_lit_obj_root

if not os.path.isfile(config.deft_cli):
    lit_config.fatal("the deft CLI is not built: %s" % config.deft_cli)
filecheck = config.deft_filecheck
if not filecheck or not os.path.isfile(filecheck):
    lit_config.fatal("FileCheck not found (DEFT_FILECHECK=%r)" % filecheck)

# The environment the CLI needs; lit passes only a few variables through by itself. Logging
# stays at its default so that stderr is the same everywhere.
for var in ["HOME", "TMPDIR", "CUDA_HOME", "CUDA_PATH", "DEFT_CUDA_INCLUDE", "DEFT_NVDISASM",
            "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES"]:
    if os.environ.get(var):
        config.environment[var] = os.environ[var]
# On a machine with a GPU driver, CUDA 13's NVRTC may take machine code from the driver's JIT
# cache and then gives no ptxas -v report: keep that cache out so that output is the same.
config.environment["CUDA_CACHE_DISABLE"] = "1"
config.environment.pop("DEFT_LOG_LEVEL", None)
config.environment.pop("DEFT_CACHE_DIR", None)
config.environment.pop("XDG_CACHE_HOME", None)

config.substitutions.append(("%deft_bin", config.deft_cli))
config.substitutions.append(("%deft", "env DEFT_CACHE_DIR=%t.cache " + config.deft_cli))
config.substitutions.append((r"\bFileCheck\b", filecheck))


def find_not():
    candidates = [os.path.join(os.path.dirname(os.path.realpath(filecheck)), "not"),
                  os.path.join(os.path.dirname(filecheck), "not"),
                  "/usr/lib/llvm-14/bin/not"]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


not_tool = find_not()
if not not_tool:
    lit_config.fatal("LLVM's `not` was not found next to FileCheck (%s)" % filecheck)
# Only `not` as a command word: at the start of a RUN line (after lit's %dbg(RUN: at line N)
# marker) or after a pipe.
config.substitutions.append(
    (r"(^\s*|%dbg\([^)]*\)\s*|\|\s*)not\s", r"\g<1>" + not_tool + " "))


def find_nvdisasm():
    # The same search as deft::disasm::nvdisasm_candidates().
    candidates = []
    v = os.environ.get("DEFT_NVDISASM")
    if v:
        candidates.append(os.path.join(v, "nvdisasm") if os.path.isdir(v) else v)
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvdisasm"))
    candidates.append("/usr/local/cuda/bin/nvdisasm")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which("nvdisasm")


if os.access("/usr/local/cuda/bin/nvdisasm", os.X_OK):
    config.available_features.add("system-nvdisasm")
nvdisasm = find_nvdisasm()
if nvdisasm:
    config.available_features.add("nvdisasm")
    lit_config.note("nvdisasm: %s (SASS tests enabled)" % nvdisasm)
else:
    lit_config.note("nvdisasm not found: SASS tests are unsupported (set DEFT_NVDISASM)")
