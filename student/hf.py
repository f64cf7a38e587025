"""The stable import of exported students: every export's `modeling_tcache.py` (and so every export ever written)
imports `TcacheStudentConfig` and `TcacheStudentForCausalLM` from here, so this path outlives moves inside student/.
The classes live in student/inference/hf.py."""

from tcache.student.inference.hf import TcacheStudentConfig, TcacheStudentForCausalLM  # noqa: F401
