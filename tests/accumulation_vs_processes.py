"""Run by tests/test_faults.py: the same 3 optimizer steps of a global batch of 8 images, either as
K processes with one micro-batch of 8/K each (DDP, gloo; under torchrun) or as one process
accumulating K micro-batches (no torchrun). Saves the weights to OUT/<model>.pt."""

import sys

import torch

from ffcv_imagenet import distributed, train
from ffcv_imagenet.models import create_model
from ffcv_imagenet.optim import create_optimizer

STEPS, GLOBAL_BATCH = 3, 8


def models():
    torch.manual_seed(0)
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 5))
    torch.manual_seed(0)
    return {"no_bn": no_bn, "resnet18": create_model("resnet18", num_classes=5)}


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)) for _ in range(STEPS)]


def micro_batches(parts: int, take=None):
    """Each global batch cut into `parts` consecutive micro-batches; only part `take` when given."""
    size = GLOBAL_BATCH // parts
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size])
            for x, y in global_batches() for i in range(parts) if take is None or i == take]


def run(out: str, processes: int) -> None:
    info = distributed.setup("cpu", cpu_threads=1)
    world = info.world_size
    for name, model in models().items():
        optimizer = create_optimizer(model, name="sgd", lr=0.2, momentum=0.9, nesterov=True)
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        batches = micro_batches(world, take=info.rank) if world > 1 else micro_batches(processes)
        trainer = train.Trainer(wrapped, optimizer, torch.device("cpu"), "fp32",
                                accum_steps=1 if world > 1 else processes)
        train.train_one_epoch(trainer, batches, epoch=0, steps_per_epoch=STEPS, lr_fn=lambda e: 0.2)
        if info.rank == 0:
            torch.save(model.state_dict(), f"{out}/{name}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
