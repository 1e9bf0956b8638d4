"""skyrt's demo model: a procedural video world, its detector, the training script and a probe.

A package of the checkout, not of the skyrt wheel: the runtime ships only the trained model folder
(runtime/models/skyrt-demo-world-v6) and never imports this package. Run it from the repository root
with the folder on the path, e.g. `PYTHONPATH=demo python -m skyrt_demo.train --out DIR`.

    world.py     numpy video world: shapes, colours, motions, backgrounds, camera pans; prompts and
                 ground truth; train / held-out split of attribute combinations; endless scenes
    detector.py  reads a clip back (background, colour, shape, motion, pan) and scores it against a prompt
    train.py     python -m skyrt_demo.train --out DIR   (VAE, then the block-causal DiT)
    probe.py     python -m skyrt_demo.probe   (can the model's VAE represent a shape; does its DiT read each word)

The trained model is an ordinary official-layout model folder: it loads with `skyrt.load(DIR/model)`.
"""
