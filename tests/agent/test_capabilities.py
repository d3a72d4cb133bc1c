"""The CPU's integer-acceleration features, read from /proc/cpuinfo (x86 and ARM)."""

from __future__ import annotations

from pathlib import Path

from agent.capabilities import capabilities, cpu_features, parse_cpuinfo
from edgefleet.core.fleet import CpuFeatures

XEON = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f \
avx512bw avx512vl avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f \
avx512bw avx512vl avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8
"""

OLD_XEON = """\
processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma
"""

GRAVITON3 = """\
processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc \
flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41

processor\t: 1
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc \
flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
"""

# A Raspberry Pi 3 (Cortex-A53): ARMv8.0, no dot product.
PI3 = """\
processor\t: 0
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd03
"""

# big.LITTLE: the little cores lack dotprod, so INT8 would crawl on them.
MIXED = GRAVITON3 + "\nprocessor\t: 2\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


def test_x86_vnni_and_amx_are_read_from_flags() -> None:
    assert parse_cpuinfo(XEON) == CpuFeatures(("avx512_vnni", "avx_vnni", "amx_int8"))
    assert parse_cpuinfo(OLD_XEON) == CpuFeatures(())


def test_arm_dotprod_and_i8mm_are_read_from_features() -> None:
    assert parse_cpuinfo(GRAVITON3) == CpuFeatures(("asimddp", "i8mm"))
    assert parse_cpuinfo(PI3) == CpuFeatures(())
    assert parse_cpuinfo(MIXED) == CpuFeatures(())  # only what every core has


def test_no_feature_list_or_no_file_is_unknown(tmp_path: Path) -> None:
    assert parse_cpuinfo("") is None
    assert parse_cpuinfo("processor\t: 0\nisa\t\t: rv64imafdc\n") is None
    assert cpu_features(tmp_path / "missing") is None  # macOS, some containers
    written = tmp_path / "cpuinfo"
    written.write_text(GRAVITON3)
    assert cpu_features(written) == CpuFeatures(("asimddp", "i8mm"))


def test_the_agent_reports_them_with_its_capabilities() -> None:
    caps = capabilities()
    assert caps.cpu_features == cpu_features()
