"""Fine-tune and compile jobs: specs checked at submission, a manager that runs each job in
its own worker process (one per GPU, one on the CPU), and the pipeline the worker runs."""
