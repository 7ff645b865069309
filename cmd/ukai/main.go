// Command ukai is the ukai node daemon and operator CLI.
package main

import (
	"os"

	"github.com/ukai-storage/ukai/cli"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() { os.Exit(cli.Execute(version)) }
