package cli

import (
	"fmt"
	"os"
	"strings"

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

func (a *app) imageExportCmd() *cobra.Command {
	var req api.ExportRequest
	var secretFile, mutualSecretFile string
	cmd := &cobra.Command{
		Use:   "export IMAGE --initiator IQN [--chap-user U (--chap-secret-file F | --chap-secret-ref NAME)] [--mutual-chap-user U (--mutual-chap-secret-file F | --mutual-chap-secret-ref NAME)]",
		Short: "Allow an initiator to log in to an image's target, with optional one-way or mutual CHAP",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
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
	return cmd
}

func (a *app) imageUnexportCmd() *cobra.Command {
	var initiator string
	cmd := &cobra.Command{
		Use:   "unexport IMAGE --initiator IQN",
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
	return cmd
}
