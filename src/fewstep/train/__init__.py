"""One trainer for pretraining and distillation, on accelerate + peft."""
