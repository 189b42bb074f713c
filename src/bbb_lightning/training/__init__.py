"""Fitting: the Bayes by Backprop LightningModule (:mod:`.module`), its ELBO terms
(:mod:`.objectives`), and the plumbing of a training run (non-finite guard, seeding, step
logging, optimizer state, allocator, machine faults, callbacks)."""
