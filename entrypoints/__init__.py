"""The server's commands, registered in the `loraserve.commands` entry-point group that the client's
`loraserve` command discovers. The top floor: the one package that may import both gateway/ and serving/."""
