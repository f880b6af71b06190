"""Install what lora-engine needs that the host does not already have.

AUTOMATIC1111 runs this file with its own Python before loading extensions (``launch`` importable):
then ``launch.is_installed``/``launch.run_pip`` are used. ComfyUI-Manager runs it as a plain script:
then ``python -m pip`` is used. torch and gradio are never installed or upgraded here: the host pins them.
"""
import importlib.util
import subprocess
import sys

# import name -> pip requirement (the core's runtime dependencies besides torch)
REQUIREMENTS = {"safetensors": "safetensors>=0.3", "numpy": "numpy"}
NEVER = ("torch", "gradio")


def missing(is_installed) -> list[str]:
    return [req for mod, req in REQUIREMENTS.items() if mod not in NEVER and not is_installed(mod)]


def main() -> None:
    try:
        import launch  # AUTOMATIC1111
    except ImportError:
        launch = None
    if launch is not None:
        for req in missing(launch.is_installed):
            launch.run_pip(f"install {req}", f"{req} for lora-engine")
        return
    todo = missing(lambda mod: importlib.util.find_spec(mod) is not None)
    if todo:
        subprocess.check_call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    main()
