package cli

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/cluster/tlsutil"
)

func (a *app) tlsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "tls",
		Short: "Create the cluster CA and the node certificates for mutual TLS",
		Long: `Create the cluster CA and the node certificates for mutual TLS.

Nodes authenticate each other with certificates signed by one cluster CA
(ECDSA P-256). Each node's certificate serves both ways (server and client
auth). Operators' commands need only the CA certificate (ukai --ca).
Existing files are never overwritten. Keys are written 0600, and nodes
refuse a key that is readable by others.

  ukai tls init --dir ./pki
  ukai tls issue n1 --dir ./pki --host 10.0.0.1
  ukai tls issue n2 --dir ./pki --host 10.0.0.2`,
	}
	cmd.AddCommand(a.tlsInitCmd(), a.tlsIssueCmd())
	return cmd
}

func (a *app) tlsInitCmd() *cobra.Command {
	var dir, name string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "init --dir DIR [--name NAME]",
		Short: "Create the cluster CA: DIR/ca.pem and DIR/ca-key.pem (0600)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			certPath, keyPath, err := tlsutil.InitCA(dir, name, validity)
			if err != nil {
				return err
			}
			ca, err := readCertFile(certPath)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Created the cluster CA %q, valid until %s.\n", ca.Subject.CommonName, ca.NotAfter.Format(time.DateOnly))
			fmt.Fprintf(w, "  certificate: %s\n", abs(certPath))
			fmt.Fprintf(w, "               every node and operator needs it (tls.ca, ukai --ca)\n")
			fmt.Fprintf(w, "  key:         %s (mode 0600)\n", abs(keyPath))
			fmt.Fprintf(w, "               it signs node certificates: keep it off the nodes, never share it\n")
			fmt.Fprintf(w, "\nNext, for each node:\n  ukai tls issue NODE --dir %s --host <node IP>\n", shellQuote(dir))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory to write the CA into (created 0700 if missing)")
	cmd.Flags().StringVar(&name, "name", "ukai cluster CA", "CommonName of the CA")
	cmd.Flags().DurationVar(&validity, "validity", tlsutil.DefaultCAValidity, "how long the CA is valid")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func (a *app) tlsIssueCmd() *cobra.Command {
	var dir string
	var hosts []string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "issue NODE --dir DIR [--host IP ...]",
		Short: "Issue NODE's certificate, signed by the CA in DIR: DIR/NODE.pem and DIR/NODE-key.pem (0600)",
		Long: `Issue NODE's certificate, signed by the CA in DIR (ca.pem, ca-key.pem):
DIR/NODE.pem and DIR/NODE-key.pem (0600). Its CommonName is NODE, and it is
valid for the --host addresses and names (default 127.0.0.1 and localhost;
NODE is added as a name), for server and client auth, and never beyond the
CA's expiry.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			node := args[0]
			certPath, keyPath, err := tlsutil.Issue(filepath.Join(dir, tlsutil.CACertFile), filepath.Join(dir, tlsutil.CAKeyFile), dir, node, hosts, validity)
			if err != nil {
				return err
			}
			leaf, err := readCertFile(certPath)
			if err != nil {
				return err
			}
			printIssued(cmd.OutOrStdout(), node, leaf, abs(filepath.Join(dir, tlsutil.CACertFile)), abs(certPath), abs(keyPath))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory holding the CA (from ukai tls init); the node's files are written there")
	cmd.Flags().StringSliceVar(&hosts, "host", nil, "IP address or DNS name the node is reached at (repeat or comma-separate; default 127.0.0.1,localhost)")
	cmd.Flags().DurationVar(&validity, "validity", tlsutil.DefaultCertValidity, "how long the certificate is valid (capped at the CA's expiry)")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func printIssued(w io.Writer, node string, leaf *x509.Certificate, ca, cert, key string) {
	var sans []string
	for _, ip := range leaf.IPAddresses {
		sans = append(sans, ip.String())
	}
	sans = append(sans, leaf.DNSNames...)
	fmt.Fprintf(w, "Issued the certificate of node %s, valid until %s, for %s.\n", node, leaf.NotAfter.Format(time.DateOnly), strings.Join(sans, ", "))
	fmt.Fprintf(w, "  certificate: %s\n", cert)
	fmt.Fprintf(w, "  key:         %s (mode 0600)\n", key)
	fmt.Fprintf(w, "  CA:          %s\n", ca)
	fmt.Fprintf(w, "\nCopy these three files to %s (the key stays 0600: a node refuses a key readable by\n", node)
	fmt.Fprintf(w, "others) and set in its configuration, with the paths they have there:\n\n")
	fmt.Fprintf(w, "tls:\n  ca: %s\n  cert: %s\n  key: %s\n", ca, cert, key)
	addr := "<address>"
	if len(leaf.IPAddresses) > 0 && !leaf.IPAddresses[0].IsLoopback() {
		_, port, _ := net.SplitHostPort(DefaultAPI)
		addr = net.JoinHostPort(leaf.IPAddresses[0].String(), port)
	}
	fmt.Fprintf(w, "\nOperators then use: ukai --ca %s --api %s ...\n", shellQuote(ca), addr)
}

func readCertFile(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return x509.ParseCertificate(b.Bytes)
}

func abs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// shellQuote quotes s for a copy-pasted command line when it needs it.
func shellQuote(s string) string {
	if s != "" && !strings.ContainsAny(s, " \t\n'\"\\$`!*?[]{}()<>|&;#~") {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
