package cli

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"
)

// readSecretFile reads a secret from a file that others cannot read.
func readSecretFile(flag, path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", flag, err)
	}
	if st.Mode().Perm()&0o004 != 0 {
		return "", fmt.Errorf("%s: %s is world-readable: it holds a secret (chmod o-r)", flag, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", flag, err)
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// accessGrantCmd is `ukai access grant`. With legacy it is also the
// old `ukai image export IMAGE --initiator ...` (deprecated: rbd users
// expect `image export` to write the image's data to a file, which it does
// without --initiator).
func (a *app) accessGrantCmd(legacy bool) *cobra.Command {
	var req api.ExportRequest
	var secretFile, mutualSecretFile string
	var data *cobra.Command
	if legacy {
		data = a.imageExportDataCmd()
	}
	cmd := &cobra.Command{
		Use:   "grant IMAGE --initiator IQN [--chap-user U (--chap-secret-file F | --chap-secret-ref NAME)] [--mutual-chap-user U (--mutual-chap-secret-file F | --mutual-chap-secret-ref NAME)]",
		Short: "Allow an initiator to log in to an image's target, with optional one-way or mutual CHAP",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if legacy {
				if !cmd.Flags().Changed("initiator") {
					if len(args) != 2 {
						return fmt.Errorf("usage: ukai image export IMAGE FILE (the image's data; - for stdout); access is 'ukai access grant'")
					}
					return data.RunE(cmd, args)
				}
				if len(args) != 1 {
					return fmt.Errorf("image export --initiator takes one image")
				}
				fmt.Fprintln(cmd.ErrOrStderr(), "warning: 'ukai image export IMAGE --initiator' is deprecated and goes away in the next release: use 'ukai access grant'")
			}
			if req.Initiator == "" {
				return fmt.Errorf("--initiator is required (an IQN, or * with CHAP)")
			}
			var err error
			if secretFile != "" {
				if req.CHAPSecret, err = readSecretFile("--chap-secret-file", secretFile); err != nil {
					return err
				}
			}
			if mutualSecretFile != "" {
				if req.MutualSecret, err = readSecretFile("--mutual-chap-secret-file", mutualSecretFile); err != nil {
					return err
				}
			}
			if err := a.client().Export(cmd.Context(), args[0], req); err != nil {
				return fmt.Errorf("export %s: %w", args[0], err)
			}
			how := "without CHAP"
			if req.CHAPUser != "" {
				how = "with CHAP user " + req.CHAPUser
				if req.MutualUser != "" {
					how += " and mutual CHAP"
				}
			}
			fmt.Fprintf(a.out, "%s exported to %s %s\n", args[0], req.Initiator, how)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Initiator, "initiator", "", "initiator IQN allowed to log in (* = any, CHAP required)")
	f.StringVar(&req.CHAPUser, "chap-user", "", "CHAP user the initiator must log in as")
	f.StringVar(&secretFile, "chap-secret-file", "", "file holding the CHAP secret (sent to ukai; stored only if the cluster allows it)")
	f.StringVar(&req.CHAPSecretFile, "chap-secret-ref", "", "name of a file in every node's iscsi.chap_secrets_dir holding the secret")
	f.StringVar(&req.MutualUser, "mutual-chap-user", "", "CHAP user the target answers with (mutual CHAP)")
	f.StringVar(&mutualSecretFile, "mutual-chap-secret-file", "", "file holding the target's CHAP secret")
	f.StringVar(&req.MutualSecretFile, "mutual-chap-secret-ref", "", "name of a file in every node's iscsi.chap_secrets_dir holding the target's secret")
	if legacy {
		cmd.Use = "export IMAGE FILE"
		cmd.Short = "Write an image's or snapshot's data to a raw file (or - for stdout); the same as download"
		cmd.Args = cobra.RangeArgs(1, 2)
	}
	return cmd
}

// accessRevokeCmd is `ukai access revoke`; with legacy, the deprecated
// `ukai image unexport`.
func (a *app) accessRevokeCmd(legacy bool) *cobra.Command {
	var initiator string
	cmd := &cobra.Command{
		Use:   "revoke IMAGE --initiator IQN",
		Short: "Remove an initiator's access to an image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if initiator == "" {
				return fmt.Errorf("--initiator is required")
			}
			if err := a.client().Unexport(cmd.Context(), args[0], initiator); err != nil {
				return fmt.Errorf("unexport %s: %w", args[0], err)
			}
			fmt.Fprintf(a.out, "%s no longer exported to %s\n", args[0], initiator)
			return nil
		},
	}
	cmd.Flags().StringVar(&initiator, "initiator", "", "initiator IQN")
	if legacy {
		cmd.Use = "unexport IMAGE --initiator IQN"
		cmd.Deprecated = "use 'ukai access revoke'; it goes away in the next release"
	}
	return cmd
}

// accessCmd is the iSCSI access to images: which initiators may log in.
func (a *app) accessCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "access", Short: "Which initiators may log in to an image's iSCSI target (and with which CHAP)"}
	var output string
	list := &cobra.Command{
		Use:   "list IMAGE",
		Short: "List the initiators that may log in to an image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			img, err := a.client().GetImage(cmd.Context(), args[0], false)
			if err != nil {
				return fmt.Errorf("access list %s: %w", args[0], err)
			}
			if output != "table" {
				return printAs(a.out, output, img.Exports)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "INITIATOR\tCHAP USER\tMUTUAL USER\tSECRET IN")
			for _, e := range img.Exports {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.Initiator, dash(e.CHAPUser), dash(e.MutualUser), dash(e.SecretIn))
			}
			return tw.Flush()
		},
	}
	list.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	cmd.AddCommand(a.accessGrantCmd(false), a.accessRevokeCmd(false), list)
	return cmd
}
