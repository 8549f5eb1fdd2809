"""Run logging: the console (through tqdm, so bars stay intact), ``log.txt`` and TensorBoard."""
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class RunLog:
    """Appends to ``save/log.txt`` and writes TensorBoard events to ``save``.

    Only one process of a distributed run logs (``enabled``); the others get a silent log.
    """

    def __init__(self, save: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.save = Path(save)
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.save.mkdir(parents=True, exist_ok=True)
            self.file = open(self.save / "log.txt", "a", buffering=1)
            if tensorboard:
                self.writer = SummaryWriter(str(self.save))

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        tqdm.write(message)
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.enabled:
            if self.writer is not None:
                self.writer.close()
            self.file.close()
