// Validates FHIR R4 JSON resources with HAPI FHIR's instance validator, offline.
//
// Run with Java's single-file source launcher (no build step):
//   java -cp '<libs>/*' Validate.java [--package PKG.tgz ...] FILE.json [FILE.json ...]
// where <libs> holds the jars that pom.xml beside this file fetches from Maven Central.
//
// --package loads the CodeSystems of a FHIR NPM package (e.g. hl7.terminology.r4, HL7's own
// terminology release) ahead of the core R4 4.0.1 definitions: codes added to HL7 code systems
// after 2019, such as v3-ObservationValue#AIAST, are then known to the validator.
//
// Output, one block per file (tab-separated, easy to parse):
//   FILE<TAB><path>
//   ISSUE<TAB><severity><TAB><location><TAB><message>   (zero or more)
// Exit status: 0 when every file was read and validated (whatever the issues), 2 otherwise.
// Codes from code systems the validator does not know (scanwatch's own urn: systems) are
// reported as warnings, not errors: they cannot be checked offline.

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import org.hl7.fhir.common.hapi.validation.support.PrePopulatedValidationSupport;
import org.hl7.fhir.r4.model.CodeSystem;
import org.hl7.fhir.utilities.npm.NpmPackage;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.UnknownCodeSystemWarningValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;

public class Validate {
  public static void main(String[] args) throws Exception {
    FhirContext ctx = FhirContext.forR4();
    UnknownCodeSystemWarningValidationSupport unknownSystems =
        new UnknownCodeSystemWarningValidationSupport(ctx);
    unknownSystems.setNonExistentCodeSystemSeverity(
        org.hl7.fhir.common.hapi.validation.support.UnknownCodeSystemWarningValidationSupport
            .DEFAULT_SEVERITY);
    List<String> files = new ArrayList<>();
    PrePopulatedValidationSupport packages = new PrePopulatedValidationSupport(ctx);
    for (int i = 0; i < args.length; i++) {
      if (args[i].equals("--package")) {
        loadCodeSystems(ctx, packages, Path.of(args[++i]));
      } else {
        files.add(args[i]);
      }
    }
    ValidationSupportChain chain =
        new ValidationSupportChain(
            packages,
            new DefaultProfileValidationSupport(ctx),
            new CommonCodeSystemsTerminologyService(ctx),
            new InMemoryTerminologyServerValidationSupport(ctx),
            new SnapshotGeneratingValidationSupport(ctx),
            unknownSystems);
    FhirInstanceValidator module = new FhirInstanceValidator(chain);
    FhirValidator validator = ctx.newValidator().registerValidatorModule(module);
    int status = 0;
    for (String arg : files) {
      System.out.println("FILE\t" + arg);
      try {
        String text = Files.readString(Path.of(arg), StandardCharsets.UTF_8);
        ValidationResult result = validator.validateWithResult(text);
        for (SingleValidationMessage message : result.getMessages()) {
          ResultSeverityEnum severity = message.getSeverity();
          System.out.println(
              "ISSUE\t"
                  + severity.getCode()
                  + "\t"
                  + clean(message.getLocationString())
                  + "\t"
                  + clean(message.getMessage()));
        }
      } catch (Exception e) {
        System.out.println("ISSUE\tfatal\t\t" + clean(e.toString()));
        status = 2;
      }
    }
    System.out.flush();
    System.exit(status);
  }

  private static void loadCodeSystems(
      FhirContext ctx, PrePopulatedValidationSupport support, Path tgz) throws Exception {
    try (InputStream in = Files.newInputStream(tgz)) {
      NpmPackage npm = NpmPackage.fromPackage(in);
      for (String name : npm.listResources("CodeSystem")) {
        try (InputStream resource = npm.load("package", name)) {
          support.addCodeSystem((CodeSystem) ctx.newJsonParser().parseResource(resource));
        }
      }
    }
  }

  private static String clean(String text) {
    return text == null ? "" : text.replace('\t', ' ').replace('\n', ' ').replace('\r', ' ');
  }
}
