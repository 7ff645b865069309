// Package cli is the ukai command line: the daemon (`ukai serve`) and the
// operator's commands, which talk to a node's control API.
package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

// DefaultAPI is the control API address used when neither --api nor
// UKAI_API is given.
const DefaultAPI = "127.0.0.1:7700"

type app struct {
	version string
	apiAddr string
	out     io.Writer
}

// NewRoot returns the ukai command tree.
func NewRoot(version string) *cobra.Command {
	a := &app{version: version, out: os.Stdout}
	root := &cobra.Command{
		Use:           "ukai",
		Short:         "ukai: distributed local storage for virtual-machine disk images",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	def := DefaultAPI
	if env := os.Getenv("UKAI_API"); env != "" {
		def = env
	}
	root.PersistentFlags().StringVar(&a.apiAddr, "api", def, "control API address of the node to talk to (env UKAI_API)")
	root.AddCommand(a.serveCmd(), a.imageCmd(), a.locationCmd(), a.nodeCmd(), a.policyCmd(), a.statsCmd(), a.versionCmd())
	return root
}

// Execute runs the CLI and returns the process exit code.
func Execute(version string) int {
	root := NewRoot(version)
	if err := root.ExecuteContext(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "ukai:", err)
		return 1
	}
	return 0
}

func (a *app) client() *api.Client { return api.NewClient(a.apiAddr) }

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return fmt.Errorf("--output %q: want table or json", o)
	}
	return nil
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of this binary (and of the node, if reachable with --api)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(a.out, "ukai %s\n", a.version)
			if cmd.Flags().Changed("api") || os.Getenv("UKAI_API") != "" {
				v, err := a.client().Version(cmd.Context())
				if err != nil {
					return err
				}
				fmt.Fprintf(a.out, "node %s: ukai %s (API %s)\n", a.apiAddr, v.Version, v.API)
			}
			return nil
		},
	}
}
