"""Rollout backends behind one protocol (:class:`epo_cli.sampling.base.Sampler`)."""
