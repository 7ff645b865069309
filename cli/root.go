// Package cli is the ukai command line: the daemon (`ukai serve`) and the
// operator's commands, which talk to a node's control API.
package cli

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/tlsutil"
)

// DefaultAPI is the control API address used when neither --api nor
// UKAI_API is given.
const DefaultAPI = "127.0.0.1:7700"

type app struct {
	version   string
	apiAddr   string
	tokenFile string // --token-file; UKAI_TOKEN is read at client creation
	caFile    string // --ca: speak https and verify the node by this CA
	out       io.Writer
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
	root.PersistentFlags().StringVar(&a.tokenFile, "token-file", "", "file holding the API bearer token, not readable by others (env UKAI_TOKEN holds the token itself; this flag wins)")
	root.PersistentFlags().StringVar(&a.caFile, "ca", "", "cluster CA certificate (ca.pem): talk https to the API and verify the node by this CA")
	root.AddCommand(a.serveCmd(), a.imageCmd(), a.accessCmd(), a.snapshotCmd(), a.locationCmd(), a.nodeCmd(), a.groupCmd(), a.policyCmd(), a.trashCmd(), a.statsCmd(), a.statusCmd(), a.versionCmd(), a.tlsCmd())
	strictGroups(root)
	completeNames(a, root)
	for _, path := range [][]string{{"image", "resize"}, {"image", "set"}, {"image", "attach"}, {"image", "detach"},
		{"location", "add"}, {"location", "remove"}, {"snapshot", "create"}, {"snapshot", "revert"}, {"trash", "restore"}, {"node", "cordon"}, {"node", "uncordon"}} {
		if c, _, err := root.Find(path); err == nil && c.Flags().Lookup("output") == nil {
			c.Flags().StringP("output", "o", "table", "output format: table, json or yaml (the resulting record)")
			if c.PreRunE == nil {
				// A bad -o is refused before anything changes.
				c.PreRunE = func(cmd *cobra.Command, _ []string) error {
					o, _ := cmd.Flags().GetString("output")
					return checkOutput(o)
				}
			}
		}
	}
	// pflag marks every boolean flag "[=true|false]" in help texts: noise
	// for flags that are simply given or not. Blanked to the same width,
	// so the columns stay aligned.
	cobra.AddTemplateFunc("plainBools", func(s string) string {
		return strings.ReplaceAll(s, "[=true|false]", strings.Repeat(" ", len("[=true|false]")))
	})
	root.SetUsageTemplate(strings.ReplaceAll(root.UsageTemplate(), "FlagUsages | trimTrailingWhitespaces", "FlagUsages | plainBools | trimTrailingWhitespaces"))
	return root
}

// strictGroups makes every command group refuse a subcommand it does not
// have (cobra prints the group's help and exits 0, so `ukai image rm vm7`
// looked like it had worked), with the nearest names as suggestions; and
// gives list, delete and remove the short names rbd users type (ls, rm).
func strictGroups(cmd *cobra.Command) {
	for _, c := range cmd.Commands() {
		switch c.Name() {
		case "list":
			c.Aliases = appendNew(c.Aliases, "ls")
		case "delete", "remove":
			c.Aliases = appendNew(c.Aliases, "rm")
		}
		if c.HasSubCommands() && !c.Runnable() {
			c.Args = cobra.ArbitraryArgs
			c.RunE = func(cmd *cobra.Command, args []string) error {
				if len(args) == 0 {
					return cmd.Help()
				}
				msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
				if cmd.SuggestionsMinimumDistance <= 0 {
					cmd.SuggestionsMinimumDistance = 2 // cobra's default, applied only at the root
				}
				if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
					msg += "; did you mean " + strings.Join(s, " or ") + "?"
				}
				return fmt.Errorf("%s (run '%s --help' for the commands)", msg, cmd.CommandPath())
			}
		}
		strictGroups(c)
	}
}

func appendNew(list []string, v string) []string {
	for _, x := range list {
		if x == v {
			return list
		}
	}
	return append(list, v)
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

// client returns the API client of --api, with the token of --token-file
// or UKAI_TOKEN and, with --ca, https verified by that CA. A bad token file
// or CA makes every call of the client fail with the reason.
func (a *app) client() *api.Client {
	token, err := a.token()
	if err != nil {
		return api.NewErrorClient(err)
	}
	var tlsConf *tls.Config
	if a.caFile != "" {
		// Nodes are addressed by IP: trust any node certificate of the
		// cluster CA rather than match the address against its names.
		if tlsConf, err = (tlsutil.Files{CA: a.caFile}).ClientConfig(""); err != nil {
			return api.NewErrorClient(fmt.Errorf("--ca: %w", err))
		}
	}
	return api.NewClientWithAuth(a.apiAddr, token, tlsConf)
}

// maxTokenFile bounds what is read of a token file.
const maxTokenFile = 4096

// token returns the API token: the content of --token-file (refused when
// readable by others), else $UKAI_TOKEN, else "". Errors never show it.
func (a *app) token() (string, error) {
	if a.tokenFile == "" {
		return checkToken(os.Getenv("UKAI_TOKEN"), "UKAI_TOKEN")
	}
	if err := tlsutil.CheckSecretFile(a.tokenFile); err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	f, err := os.Open(a.tokenFile)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxTokenFile+1))
	if err != nil {
		return "", fmt.Errorf("--token-file %s: %w", a.tokenFile, err)
	}
	if len(data) > maxTokenFile {
		return "", fmt.Errorf("--token-file %s: larger than %d bytes, not a token", a.tokenFile, maxTokenFile)
	}
	tok, err := checkToken(string(data), "token file "+a.tokenFile)
	if err == nil && tok == "" {
		err = fmt.Errorf("token file %s is empty", a.tokenFile)
	}
	return tok, err
}

// checkToken trims the token and refuses one that cannot go in a header.
func checkToken(tok, from string) (string, error) {
	tok = strings.TrimSpace(tok)
	for _, r := range tok {
		if r < 0x21 || r == 0x7f {
			return "", errors.New(from + ": the token has spaces or control characters")
		}
	}
	return tok, nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// checkOutput validates -o of a command that prints one record or list.
func checkOutput(o string) error {
	if o != "table" && o != "json" && o != "yaml" {
		return fmt.Errorf("--output %q: want table, json or yaml", o)
	}
	return nil
}

// checkOutputJSON validates -o of a command whose machine form is a JSON
// stream (progress lines, samples): table or json.
func checkOutputJSON(o string) error {
	if o != "table" && o != "json" {
		return fmt.Errorf("--output %q: want table or json", o)
	}
	return nil
}

// printIfAsked prints v as -o asks when it asks for json or yaml (asked
// true); a command that changed something then prints the resulting
// record instead of its sentence.
func printIfAsked(cmd *cobra.Command, w io.Writer, v any) (bool, error) {
	o, err := cmd.Flags().GetString("output")
	if err != nil || o == "table" {
		return false, nil
	}
	if err := checkOutput(o); err != nil {
		return true, err
	}
	return true, printAs(w, o, v)
}

// printAs prints v as JSON or YAML (with the JSON field names).
func printAs(w io.Writer, format string, v any) error {
	if format != "yaml" {
		return printJSON(w, v)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber() // sizes print as 1048576, not 1.048576e+06
	var generic any
	if err := dec.Decode(&generic); err != nil {
		return err
	}
	out, err := yaml.Marshal(plainNumbers(generic))
	if err != nil {
		return err
	}
	_, err = w.Write(out)
	return err
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

// completeNames lets the shell complete image and node names from the
// cluster (`ukai completion bash|zsh|fish`): a command's first argument
// is an image when its usage names one (IMAGE, NAME, SOURCE), a node when
// it names NODE; --node flags complete nodes. Asking the node is bounded
// by the completion's own context; a node that does not answer completes
// nothing.
func completeNames(a *app, cmd *cobra.Command) {
	for _, c := range cmd.Commands() {
		completeNames(a, c)
		if c.ValidArgsFunction != nil || !c.Runnable() {
			continue
		}
		f := strings.Fields(c.Use)
		if len(f) < 2 {
			continue
		}
		switch f[1] {
		case "IMAGE", "NAME", "SOURCE":
			c.ValidArgsFunction = func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
				if len(args) > 0 {
					return nil, cobra.ShellCompDirectiveDefault
				}
				return a.imageNames(cmd), cobra.ShellCompDirectiveNoFileComp
			}
		case "NODE":
			c.ValidArgsFunction = func(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
				if len(args) > 0 {
					return nil, cobra.ShellCompDirectiveNoFileComp
				}
				return a.nodeNames(cmd), cobra.ShellCompDirectiveNoFileComp
			}
		}
		if c.Flags().Lookup("node") != nil {
			c.RegisterFlagCompletionFunc("node", func(cmd *cobra.Command, _ []string, _ string) ([]string, cobra.ShellCompDirective) {
				return a.nodeNames(cmd), cobra.ShellCompDirectiveNoFileComp
			})
		}
	}
}

func (a *app) imageNames(cmd *cobra.Command) []string {
	l, err := a.client().ListImages(cmd.Context())
	if err != nil {
		return nil
	}
	var out []string
	for _, img := range l.Images {
		out = append(out, img.Name)
	}
	return out
}

func (a *app) nodeNames(cmd *cobra.Command) []string {
	ns, err := a.client().ListNodes(cmd.Context())
	if err != nil {
		return nil
	}
	var out []string
	for _, n := range ns {
		out = append(out, n.Name)
	}
	return out
}

// plainNumbers turns the json.Numbers of a decoded value into integers
// (or floats when they are not), for YAML.
func plainNumbers(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			x[k] = plainNumbers(e)
		}
	case []any:
		for i, e := range x {
			x[i] = plainNumbers(e)
		}
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return i
		}
		if f, err := x.Float64(); err == nil {
			return f
		}
		return x.String()
	}
	return v
}
