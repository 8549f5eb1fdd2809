"""The training of stages 1 and 3: the step (``step``), the reference's nn.DataParallel pieces
(``pieces``), the parameter groups, the losses and the teacher."""
