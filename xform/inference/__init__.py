"""Big-model inference: build a module without weights, place its blocks on devices by
their bytes, stream a checkpoint into place, and run it across accelerators, CPU and disk.

    model = xf.init_empty(lambda: GPT(config))                  # meta tensors, no memory
    dm = xf.device_map(model, max_memory={"cpu": "8GiB", "disk": None}, no_split=["Block"])
    xf.load_weights(model, "ckpt/", device_map=dm, offload_dir="offload/")
    xf.dispatch(model, dm, offload_dir="offload/")              # plain model(x) from here
    print(dm)                                                   # the placement table
"""

from xform.inference._dispatch import dispatch
from xform.inference._empty import init_empty
from xform.inference._load import load_weights
from xform.inference._map import DeviceMap, device_map
from xform.inference._save import save_sharded

__all__ = ["DeviceMap", "device_map", "dispatch", "init_empty", "load_weights", "save_sharded"]
