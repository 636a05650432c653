"""Attack 17d: time from SimulationSuperLink() to a joined driver's first Ray task, with and without
attack17d's loopback-only setting, arms alternating. (Measured before the merge with
startup17c, when the "before" arm also had no token; since the merge the head always has
startup17c's token and this compares the loopback setting alone.)

Run: ``.venv/bin/python docs/attacks/scripts/issue17d_ray_startup.py 5``
"""
import os, statistics, subprocess, sys, time
import fedsafe.simulations.runner as runner
from fedsafe.simulations.runner import SimulationSuperLink
orig = runner.simulation_env
def without(home, ray_address="local"):
    env = orig(home, ray_address)
    for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    return env
DRIVER = "import ray; ray.init(); ray.get(ray.remote(lambda: 1).remote())"
times = {"attack17d": [], "before": []}
for rep in range(int(sys.argv[1])):
    for arm in ("before", "attack17d") if rep % 2 else ("attack17d", "before"):
        runner.simulation_env = orig if arm == "attack17d" else without
        t0 = time.perf_counter()
        link = SimulationSuperLink()
        try:
            assert link.wait_ready(120) and link.ray_head.wait_ready(120)
            env = runner.simulation_env(link.home, link.ray_head.address)
            head_env = open(f"/proc/{link.ray_head.process.pid}/environ", "rb").read().split(b"\0")
            env.update(k.decode().split("=", 1) for k in [v for v in head_env if v.startswith(b"RAY_AUTH_")])
            subprocess.run([sys.executable, "-c", DRIVER], env=env, check=True, capture_output=True, timeout=180)
            times[arm].append(time.perf_counter() - t0)
        finally:
            link.close()
for arm, v in times.items():
    print(f"{arm}: median {statistics.median(v):.2f} s (range {min(v):.2f}-{max(v):.2f}) over {len(v)}")
