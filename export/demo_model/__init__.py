"""skyrt's embedded demo model: a procedural video world, its detector and the training script.

    world.py     numpy video world: shapes, colours, motions, backgrounds, camera pans; prompts and
                 ground truth; train / held-out split of attribute combinations; endless scenes
    detector.py  reads a clip back (background, colour, shape, motion, pan) and scores it against a prompt
    train.py     python -m skyrt.export.demo_model.train --out DIR   (VAE, then the block-causal DiT)

The trained model is an ordinary official-layout model folder: it loads with `skyrt.load(DIR/model)`.
"""
