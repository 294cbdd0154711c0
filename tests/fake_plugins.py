"""Test plugins, loaded through entry points like the real ones (see conftest's sys.path entry)."""

from attn_dispatch import MissingDependency, PluginSpec, hookimpl, reference


def scaled_decode_query(q, q_rope, *, num_heads, kv_lora_rank, decode_impl):
    return reference.mla_decode_query(q, q_rope, num_heads=num_heads, kv_lora_rank=kv_lora_rank, decode_impl=decode_impl)


def model_side_query(q, q_rope, *, is_decode, decode_impl, kv_lora_rank=None, llama_4_scaling=None):
    return reference.mla_query_for_backend(
        q, q_rope, is_decode=is_decode, decode_impl=decode_impl, kv_lora_rank=kv_lora_rank, llama_4_scaling=llama_4_scaling
    )


class _Plugin:
    def __init__(self, name, archs=("cpu",), requires=(), ops=None, decline=None):
        self.name, self.archs, self.requires = name, archs, requires
        self.ops = ops or {}
        self.decline = decline
        self.register_calls = 0

    @hookimpl
    def attn_dispatch_plugin_spec(self, hardware):
        return PluginSpec(name=self.name, archs=self.archs, requires=self.requires)

    @hookimpl
    def attn_dispatch_register_ops(self, hardware, register):
        self.register_calls += 1
        if self.decline:
            raise self.decline
        for op, fn in self.ops.items():
            register(op, fn, note="test")


query_plugin = _Plugin(
    "test_query", ops={"mla_query_for_backend": model_side_query, "mla_decode_query": scaled_decode_query}
)
second_query_plugin = _Plugin(
    "test_query_two", ops={"mla_query_for_backend": model_side_query, "mla_decode_query": scaled_decode_query}
)
half_group_plugin = _Plugin("test_half", ops={"mla_decode_query": scaled_decode_query})
gpu_only_plugin = _Plugin("test_gpu", archs=("sm90",))
missing_dep_plugin = _Plugin("test_missing", requires=("surely_not_an_installed_module_xyz",))
declining_plugin = _Plugin("test_decline", decline=MissingDependency("kernels not built for this card"))
raising_plugin = _Plugin("test_raise", decline=RuntimeError("bug in plugin"))
