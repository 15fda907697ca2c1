"""python launch.py model=ernie tp=8 server.port=8188 — serves the composed config (as `fdkit serve`)."""

import hydra
from omegaconf import DictConfig

from fdkit.config import register_configs


@hydra.main(config_path="fdkit/conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fdkit.launch import run

    run(cfg)


if __name__ == "__main__":
    register_configs()
    main()
