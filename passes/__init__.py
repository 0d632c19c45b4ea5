"""Every FX graph pass of awqfx, each a function over a GraphModule (installed as ``awqfx.passes``)."""
from awqfx.passes.act_quantizers import ActQuantizer, insert_act_quantizers, is_act_quantizer
from awqfx.passes.channels import ChannelPropagator, Flow
from awqfx.passes.discover import DiscoveryError, discover, normalize_modules
from awqfx.passes.dtype_asserts import drop_dtype_asserts
from awqfx.passes.fold import fold_scales
from awqfx.passes.input_scales import InputScaleError, input_scale_attr, insert_input_scales
from awqfx.passes.observers import MeanAbsObserver, SampleObserver, insert_observers, is_observer, remove_observers
from awqfx.passes.pack_linears import pack_linears
from awqfx.passes.quantize_linears import quantize_linears
from awqfx.passes.region import Region, extract_region

__all__ = [
    "discover", "DiscoveryError", "normalize_modules", "ChannelPropagator", "Flow", "insert_observers",
    "remove_observers", "is_observer", "MeanAbsObserver", "SampleObserver", "fold_scales",
    "insert_input_scales", "input_scale_attr", "InputScaleError", "extract_region", "Region", "drop_dtype_asserts",
    "quantize_linears", "pack_linears", "insert_act_quantizers", "ActQuantizer", "is_act_quantizer",
]
