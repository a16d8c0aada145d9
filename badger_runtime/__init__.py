"""badger: Badger agents, learned learners made of many experts that share one policy.

The deploy path (this package without its ``training`` subpackage) never imports torch:

    from badger_runtime import load_policy, Agent
    policy = load_policy("policies/guessing-converge-v2.onnx")
    agent = Agent(policy).reset(batch=1, experts=3, dims=3, seed=0)

Where things live: ``rollout`` (the inner loop, written once), ``routing`` (the router),
``agreement`` (when a communication stage ends), ``membrane`` (agent <-> environment),
``engine`` (batched numpy + onnxruntime), ``actors`` (the actor runtime), ``serve`` (the
long-running service), ``training`` (torch: model, outer loop, ONNX export).
"""

from .config import AgentConfig, ConfigError, ExperimentConfig, PolicySpec, TaskConfig
from .engine import Agent, InputError
from .policy_card import OnnxPolicy, PolicyError, load_policy

__version__ = "0.1.0"

__all__ = ["Agent", "AgentConfig", "ConfigError", "ExperimentConfig", "InputError", "OnnxPolicy", "PolicyError",
           "PolicySpec", "TaskConfig", "load_policy", "__version__"]
